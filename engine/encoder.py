"""CLIP as the item encoder: loading, grouped-adapter injection, and the two-tower forward."""

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel
from transformers.utils import logging as transformers_logging

from .adapters.context import GroupContext
from .adapters.ia3 import GroupedIA3Linear
from .adapters.lora import GroupedLoRALinear
from .clip_layers import prepare_clip
from .errors import InputError
from .inputs import Tokenizer, normalize_pixels
from .tiny_clip import CLIP_MEAN, CLIP_STD, TINY_CLIP_DIR, HashWordTokenizer, tiny_clip_config

PEFT_TYPES = ("lora", "ia3", "none")
MODALITIES = ("image", "title")

# Paper settings (§4.1.4, App. A): LoRA on q/v; (IA)3 on k/v outputs and fc1 inputs; both towers.
LORA_TARGETS = ("q_proj", "v_proj")
IA3_OUTPUT_TARGETS = ("k_proj", "v_proj")
IA3_INPUT_TARGETS = ("fc1",)
ADAPTED_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.\d+\.(self_attn|mlp)\.(\w+)$")


@dataclass
class ClipBundle:
    """A loaded CLIP with what it needs to turn titles and images into inputs."""

    model: CLIPModel
    tokenizer: Tokenizer
    tokenizer_id: str
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    source: str


def architecture_config(name: str) -> CLIPConfig:
    """Built-in architecture aliases (no weights): ``vit-b-32`` is ``openai/clip-vit-base-patch32``."""
    if name == "vit-b-32":
        return CLIPConfig()
    if name == "tiny":
        return tiny_clip_config()
    raise InputError(f"--clip {name}: unknown architecture alias (known: vit-b-32, tiny)")


def load_clip(spec: str) -> ClipBundle:
    """``tiny`` (the shipped small CLIP), a local HF CLIP directory, or a model id in the local HF cache."""
    if spec == "tiny":
        return _load_directory(TINY_CLIP_DIR, "tiny")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, str(path.resolve()))
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(spec, local_files_only=True))
    except Exception as error:
        raise InputError(
            f"--clip {spec}: not 'tiny', not a local directory, and not found in the local HF cache "
            f"(no network is used) ({type(error).__name__})"
        ) from None
    return _load_directory(cached, spec)


def _load_directory(path: Path, source: str) -> ClipBundle:
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a CLIP checkpoint directory (no config.json)")
    transformers_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise InputError(f"{path}: cannot load a CLIPModel ({type(error).__name__}: {error})") from None
    image_size = model.config.vision_config.image_size
    mean, std = CLIP_MEAN, CLIP_STD
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean = tuple(settings.get("image_mean", mean))
        std = tuple(settings.get("image_std", std))
    hashed = path / "perpeft_tokenizer.json"
    if hashed.is_file():
        tokenizer_id = hashed.read_text()
        try:
            tokenizer = HashWordTokenizer.from_json(tokenizer_id)
        except ValueError as error:
            raise InputError(f"{hashed}: {error}") from None
    else:
        tokenizer, tokenizer_id = _hf_tokenizer(path, model.config.text_config.max_position_embeddings)
    return ClipBundle(model, tokenizer, tokenizer_id, image_size, mean, std, source)


def _hf_tokenizer(path: Path, max_length: int) -> tuple[Tokenizer, str]:
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        raise InputError(f"{path}: cannot load the CLIP tokenizer ({type(error).__name__})") from None

    def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    return tokenize, f"{type(hf_tokenizer).__name__}:{len(hf_tokenizer)}:{max_length}:{path.name}"


def inject_adapters(
    clip: nn.Module,
    peft: str,
    groups: int,
    context: GroupContext,
    lora_rank: int = 4,
    lora_alpha: float = 8.0,
    lora_dropout: float = 0.1,
) -> None:
    """Replace the paper's target ``nn.Linear`` layers of both towers by grouped adapters, in place."""
    if peft not in PEFT_TYPES:
        raise InputError(f"--peft {peft}: unknown PEFT type (known: {', '.join(PEFT_TYPES)})")
    if peft == "none":
        return
    for name, module in list(clip.named_modules()):
        match = ADAPTED_LAYER.match(name)
        if match is None or not isinstance(module, nn.Linear):
            continue
        target = match.group(3)
        if peft == "lora" and target in LORA_TARGETS:
            wrapped = GroupedLoRALinear(module, groups, lora_rank, lora_alpha, lora_dropout, context)
        elif peft == "ia3" and target in IA3_OUTPUT_TARGETS + IA3_INPUT_TARGETS:
            wrapped = GroupedIA3Linear(module, groups, target in IA3_INPUT_TARGETS, context)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(clip.get_submodule(parent_name), child, wrapped)


ADAPTER_PEFTS = ("lora", "ia3")


def require_clip_adapters(run_path: Path, peft: str, purpose: str) -> None:
    """InputError unless ``peft`` puts adapters inside CLIP (LoRA, (IA)3): ``purpose`` says what needs them."""
    if peft not in ADAPTER_PEFTS:
        reason = (
            "IISAN is a side network over cached CLIP hidden states, not an adapter inside CLIP"
            if peft == "iisan"
            else "the run trains no CLIP adapter"
        )
        raise InputError(f"{run_path}: {purpose} needs a LoRA or (IA)3 run, not --peft {peft}: {reason}")


def modality_columns(modalities: tuple[str, ...], width: int) -> dict[str, slice]:
    """Columns of each modality's ``width``-wide embedding in the encoder output, in ``modalities`` order."""
    return {name: slice(index * width, (index + 1) * width) for index, name in enumerate(modalities)}


class GroupedClipEncoder(nn.Module):
    """Frozen CLIP with grouped adapters: items of any mix of groups encoded in one batch.

    Returns concat(image_embeds, text_embeds) (each L2-normalised, as CLIPModel does), the projector's
    input; ``modalities`` drops a tower (the paper's w/o-text and w/o-image ablations) without running it.
    """

    def __init__(
        self,
        bundle: ClipBundle,
        peft: str,
        groups: int,
        modalities: tuple[str, ...] = MODALITIES,
        **adapter_settings: float,
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
        inject_adapters(self.clip, peft, groups, self.context, **adapter_settings)
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
        group_ids: torch.Tensor,
    ) -> torch.Tensor:
        self.context.set(group_ids)
        parts = []
        try:
            if "image" in self.modalities:
                pixel_values = normalize_pixels(pixels, self.image_mean, self.image_std)
                pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
                parts.append(self.clip.visual_projection(pooled))
            if "title" in self.modalities:
                pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
                parts.append(self.clip.text_projection(pooled))
        finally:
            self.context.clear()
        # CLIPModel's normalisation, written out: the towers are called one by one so a dropped one never runs.
        return torch.cat([part / part.pow(2).sum(dim=-1, keepdim=True).sqrt() for part in parts], dim=-1)


class FrozenFeatures(nn.Module):
    """Frozen MM's item encoder: CLIP without adapters never changes, so its output for every item is
    computed once (``encode_frozen``) and looked up; ``forward(items, group_ids)`` returns those rows."""

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

    def forward(self, items: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return self.features[items]
