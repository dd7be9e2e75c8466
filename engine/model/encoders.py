"""CLIP as the item encoder: loading, grouped-adapter injection, and the two-tower forward."""

import copy
import re
from pathlib import Path

import torch
from torch import nn

from perpeft.engine.clip.layers import prepare_clip
from perpeft.engine.clip.loading import ClipBundle
from perpeft.engine.clip.pooled import (
    PREFIX_PARTS,
    image_prefix,
    packed_title_rows,
    pooled_image,
    pooled_text,
    title_prefix,
)
from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.config.choices import ADAPTER_PEFTS, MODALITIES
from perpeft.engine.config.run_config import PAPER_LORA, LoraSettings
from perpeft.engine.errors import InputError
from perpeft.engine.features.inputs import ItemInputs
from perpeft.engine.model.adapters.context import GroupContext
from perpeft.engine.model.adapters.ia3 import GroupedIA3Linear
from perpeft.engine.model.adapters.lora import GroupedLoRALinear
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.prefix import PREFIX_BYTES_AT_MOST, CatalogPrefix, ItemPrefix

NO_ADAPTERS = "none"  # the encoder of Frozen MM: CLIP as it is

# Paper settings (§4.1.4, App. A): LoRA on q/v; (IA)3 on k/v outputs and fc1 inputs; both towers.
LORA_TARGETS = ("q_proj", "v_proj")
IA3_OUTPUT_TARGETS = ("k_proj", "v_proj")
IA3_INPUT_TARGETS = ("fc1",)
ADAPTED_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.\d+\.(self_attn|mlp)\.(\w+)$")
TOWERS = {"image": "vision_model", "title": "text_model"}  # each modality's CLIP tower


def inject_adapters(
    clip: nn.Module,
    peft: str,
    groups: int,
    context: GroupContext,
    lora: LoraSettings = PAPER_LORA,
    towers: tuple[str, ...] = tuple(TOWERS.values()),
) -> None:
    """Replace the paper's target ``nn.Linear`` layers of ``towers`` (both by default) by grouped adapters,
    in place. A tower an encoder never runs gets none: under DistributedDataParallel every trainable
    parameter must take part in every step's loss."""
    if peft not in (*ADAPTER_PEFTS, NO_ADAPTERS):
        raise ValueError(f"adapters inside CLIP are {', '.join(ADAPTER_PEFTS)} (or {NO_ADAPTERS}), not {peft}")
    if peft == NO_ADAPTERS:
        return
    for name, module in list(clip.named_modules()):
        match = ADAPTED_LAYER.match(name)
        if match is None or match.group(1) not in towers or not isinstance(module, nn.Linear):
            continue
        target = match.group(3)
        wrapped: nn.Module
        if peft == "lora" and target in LORA_TARGETS:
            wrapped = GroupedLoRALinear(module, groups, lora.rank, lora.alpha, lora.dropout, context)
        elif peft == "ia3" and target in IA3_OUTPUT_TARGETS + IA3_INPUT_TARGETS:
            wrapped = GroupedIA3Linear(module, groups, target in IA3_INPUT_TARGETS, context)
        else:
            continue
        clip.set_submodule(name, wrapped)


def require_clip_adapters(run_path: Path, peft: str, purpose: str) -> None:
    """InputError unless ``peft`` puts adapters inside CLIP (LoRA, (IA)3): ``purpose`` says what needs them."""
    if peft not in ADAPTER_PEFTS:
        raise InputError(
            f"{run_path}: {purpose} needs a LoRA or (IA)3 run, not --peft {peft}: IISAN is a side network over "
            "cached CLIP hidden states, not an adapter inside CLIP"
        )


def modality_columns(modalities: tuple[str, ...], width: int) -> dict[str, slice]:
    """Columns of each modality's ``width``-wide embedding in the encoder output, in ``modalities`` order."""
    return {name: slice(index * width, (index + 1) * width) for index, name in enumerate(modalities)}


class GroupedClipEncoder(nn.Module):
    """Frozen CLIP with grouped adapters: items of any mix of groups encoded in one batch.

    Returns concat(image_embeds, text_embeds) (each L2-normalised, as CLIPModel does), the projector's
    input; ``modalities`` drops a tower (the paper's w/o-text and w/o-image ablations) without running it.
    """

    image_mean: torch.Tensor
    image_std: torch.Tensor

    def __init__(
        self,
        bundle: ClipBundle,
        peft: str,
        groups: int,
        modalities: tuple[str, ...] = MODALITIES,
        lora: LoraSettings = PAPER_LORA,
    ) -> None:
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.modalities = tuple(name for name in MODALITIES if name in modalities)
        # A private copy: adapters are injected in place, and one bundle may serve several encoders
        # (the Global PEFT and PerPEFT stages of a run).
        self.clip = copy.deepcopy(bundle.model)
        self.clip.requires_grad_(False)
        prepare_clip(self.clip)
        self.context = GroupContext()
        towers = tuple(TOWERS[name] for name in self.modalities)
        inject_adapters(self.clip, peft, groups, self.context, lora, towers)
        self.register_buffer("image_mean", torch.tensor(bundle.image_mean), persistent=False)
        self.register_buffer("image_std", torch.tensor(bundle.image_std), persistent=False)

    @property
    def out_features(self) -> int:
        """Width of concat(image_embeds, text_embeds) (or of the one kept), the projector's input."""
        return len(self.modalities) * self.clip.config.projection_dim

    @property
    def modality_columns(self) -> dict[str, slice]:
        """Which output columns come from the image and which from the title, in ``present`` order."""
        return modality_columns(self.modalities, self.clip.config.projection_dim)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Only the adapter parameters (what training changes), keyed by module path."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixels: torch.Tensor,
        groups: RowGroups,
        prefix: ItemPrefix | None = None,
    ) -> torch.Tensor:
        """The items' ``[N, out_features]`` vectors; with ``prefix`` (their rows of this encoder's
        `catalog_prefix`) the towers start from it, and the pixels are not read."""
        self.context.set(groups)
        parts = []
        try:
            if "image" in self.modalities:
                vision_model = self.clip.vision_model
                if prefix is None:
                    pixel_values = normalize_pixels(pixels, self.image_mean, self.image_std)
                    pooled = pooled_image(vision_model, pixel_values)
                else:
                    pooled = pooled_image(vision_model, None, prefix.image())
                parts.append(self.clip.visual_projection(pooled))
            if "title" in self.modalities:
                text_model = self.clip.text_model
                packing = packed_title_rows(input_ids, attention_mask, text_model.config.eos_token_id)
                rows = None if prefix is None else prefix.title(packing, input_ids.shape[1])
                with self.context.packed(None if packing is None else packing.lengths):
                    pooled = pooled_text(text_model, input_ids, attention_mask, packing, rows)
                parts.append(self.clip.text_projection(pooled))
        finally:
            self.context.clear()
        # CLIPModel's normalisation, written out: the towers are called one by one so a dropped one never runs.
        return torch.cat([part / part.pow(2).sum(dim=-1, keepdim=True).sqrt() for part in parts], dim=-1)

    @torch.no_grad()
    def catalog_prefix(self, inputs: ItemInputs, chunk: int) -> CatalogPrefix | None:
        """Every item's frozen first-layer prefix in both towers (`engine.model.prefix`), computed in chunks
        of ``chunk`` items on this encoder's device; None when a tower has a single layer (its only layer
        is the pooled one) or the prefix would take more than ``PREFIX_BYTES_AT_MOST``."""
        text_config, vision_config = self.clip.config.text_config, self.clip.config.vision_config
        items = inputs.present.shape[0]
        width = int(inputs.text_widths.max())
        shapes = {
            "title": (width, text_config.hidden_size),
            "image": (vision_config.positions, vision_config.hidden_size),
        }
        depths = {"title": text_config.num_hidden_layers, "image": vision_config.num_hidden_layers}
        if any(depths[name] < 2 for name in self.modalities):
            return None
        dtype = self.image_mean.dtype
        size = sum(
            items * positions * PREFIX_PARTS * hidden for positions, hidden in (shapes[m] for m in self.modalities)
        )
        if size * dtype.itemsize > PREFIX_BYTES_AT_MOST:
            return None
        device = self.image_mean.device
        parts = {
            name: torch.zeros(items, positions, PREFIX_PARTS * hidden, dtype=dtype, device=device)
            for name, (positions, hidden) in shapes.items()
            if name in self.modalities
        }
        for block in torch.arange(items).split(chunk):
            input_ids, _, pixels = inputs.batch(block, device)
            rows = block.to(device)
            if "title" in parts:
                parts["title"][rows, : input_ids.shape[1]] = title_prefix(self.clip.text_model, input_ids)
            if "image" in parts:
                pixel_values = normalize_pixels(pixels, self.image_mean, self.image_std)
                parts["image"][rows] = image_prefix(self.clip.vision_model, pixel_values)
        return CatalogPrefix(parts.get("title"), parts.get("image"))


class FrozenFeatures(nn.Module):
    """Frozen MM's item encoder: CLIP without adapters never changes, so its output for every item is
    computed once (``encode_frozen``) and looked up; ``forward(items, groups)`` returns those rows."""

    features: torch.Tensor

    def __init__(self, features: torch.Tensor, modalities: tuple[str, ...], width: int) -> None:
        super().__init__()
        self.register_buffer("features", features, persistent=False)
        self.modalities = modalities
        self.width = width

    @property
    def out_features(self) -> int:
        return self.features.shape[1]

    @property
    def modality_columns(self) -> dict[str, slice]:
        return modality_columns(self.modalities, self.width)

    def forward(self, items: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        return self.features[items]
