"""What a run trains on: its dataset, the factory of its item encoder, and that encoder's cached inputs."""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from perpeft.engine.clip.loading import ClipBundle, load_clip
from perpeft.engine.config.choices import MODALITIES
from perpeft.engine.config.methods import method_of
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.features.hidden_states import HiddenStates, load_hidden_states
from perpeft.engine.features.inputs import ItemInputs, load_item_inputs
from perpeft.engine.model.adapters.iisan import GroupedIISAN
from perpeft.engine.model.encoders import NO_ADAPTERS, FrozenFeatures, GroupedClipEncoder
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.perpeft import EncoderFactory, ItemInputSource
from perpeft.engine.runtime.device import resolve_device, to_device
from perpeft.engine.runtime.distributed import current_world


def kept_modalities(config: RunConfig) -> tuple[str, ...]:
    """The modalities a run encodes: all but those ``--no-text`` / ``--no-image`` drop (a config resolved
    for its catalog, `RunConfig.for_catalog`, drops those the catalog lacks)."""
    dropped = (config.image is False, config.text is False)
    return tuple(name for name, drop in zip(MODALITIES, dropped, strict=True) if not drop)


def clip_encoder_factory(config: RunConfig, bundle: ClipBundle) -> EncoderFactory:
    """Builds the grouped-adapter CLIP encoder for a given number of groups."""

    def build(groups: int) -> GroupedClipEncoder:
        return GroupedClipEncoder(
            bundle,
            config.peft,
            groups,
            kept_modalities(config),
            config.lora,
        )

    return build


@dataclass
class ItemIds:
    """Input source of ``FrozenFeatures``: the item ids themselves; modality presence from the input cache."""

    inputs: ItemInputs

    @property
    def has_missing(self) -> bool:
        return self.inputs.has_missing

    def modalities(self, items: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.inputs.modalities(items, device)

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (to_device(items, device),)


@torch.no_grad()
def encode_frozen(
    config: RunConfig, bundle: ClipBundle, inputs: ItemInputs, device: torch.device, progress: bool
) -> tuple[EncoderFactory, ItemIds]:
    """Frozen MM: every item through CLIP without adapters once; training then only looks rows up."""
    encoder = GroupedClipEncoder(bundle, NO_ADAPTERS, 1, kept_modalities(config)).to(device).eval()
    items = torch.arange(inputs.present.shape[0])
    parts = []
    for chunk in tqdm(items.split(config.encode_batch_size), desc="frozen CLIP", disable=not progress, leave=False):
        parts.append(encoder(*inputs.batch(chunk, device), RowGroups.one(0, chunk.shape[0], 1, device)).float().cpu())
    features = torch.cat(parts)
    width = bundle.model.config.projection_dim
    return (lambda groups: FrozenFeatures(features, encoder.modalities, width)), ItemIds(inputs)


def iisan_encoder_factory(states: HiddenStates) -> EncoderFactory:
    """Builds the grouped IISAN side network over ``states``' cached hidden states for a number of groups."""

    def build(groups: int) -> GroupedIISAN:
        return GroupedIISAN(groups, states.text_dim, states.image_dim, states.layers)

    return build


@dataclass
class RunInputs:
    """What a run trains on: the dataset, how to build its item encoder for C groups, and the encoder's inputs."""

    dataset: Dataset
    make_encoder: EncoderFactory | None
    inputs: ItemInputSource | None


def load_run_inputs(config: RunConfig, dataset: Dataset, progress: bool) -> RunInputs:
    """Item encoder and cached item inputs of a run on ``dataset`` (`run_dataset`): every user-input error
    surfaces here, a modality the catalog lacks included (`RunConfig.for_catalog`).

    Under a process group rank 0 loads first (filling the input and hidden-state caches), then the
    other ranks load from those caches, without progress bars."""
    config = config.for_catalog(dataset.has_text, dataset.has_images, str(dataset.root))
    return current_world().main_first(
        lambda: _load_run_inputs(config, dataset, progress), lambda: _load_run_inputs(config, dataset, False)
    )


def _load_run_inputs(config: RunConfig, dataset: Dataset, progress: bool) -> RunInputs:
    method = method_of(config)
    if method.encoder == "none":
        return RunInputs(dataset, None, None)  # w/o MM: ID embeddings only, CLIP never loads
    bundle = load_clip(config.clip_model)
    inputs = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress)
    device = resolve_device(config.device)
    if method.encoder == "frozen":
        return RunInputs(dataset, *encode_frozen(config, bundle, inputs, device, progress))
    if config.peft == "iisan":
        # The side network reads cached hidden states: training never runs CLIP.
        states = load_hidden_states(bundle, inputs, device, config.encode_batch_size, progress)
        return RunInputs(dataset, iisan_encoder_factory(states), states)
    return RunInputs(dataset, clip_encoder_factory(config, bundle), inputs)
