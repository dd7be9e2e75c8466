"""Parameter counts of every component (paper §3.4, Table 8), computed on the meta device: no weights load."""

import dataclasses
from pathlib import Path

import torch

from perpeft.engine.clip.loading import architecture_config
from perpeft.engine.clip.model import ClipConfig, ClipModel, read_clip_config
from perpeft.engine.config.run_config import LoraSettings, ResolvedConfig
from perpeft.engine.errors import InputError
from perpeft.engine.features.hidden_states import iisan_state_count
from perpeft.engine.model.adapters.context import GroupContext
from perpeft.engine.model.adapters.iisan import GroupedIISAN
from perpeft.engine.model.encoders import inject_adapters
from perpeft.engine.model.recommender import Recommender


def clip_config(spec: str) -> ClipConfig:
    """An architecture alias (``vit-b-32``, ``tiny``) or the ``config.json`` of a local CLIP directory."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_clip_config(path)
    return architecture_config(spec)


def _count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(
    clip: str,
    peft: str,
    groups: int,
    items: int,
    hidden: int = 32,
    maxlen: int = 10,
    lora_rank: int = 4,
    missing_modalities: bool = False,
) -> dict[str, int]:
    """Counts keyed as the ``params`` command's JSON: frozen CLIP, per-group PEFT and projector, SASRec,
    transductive (ID + position embeddings), and the Global PEFT and PerPEFT totals.

    ``missing_modalities`` counts the projector's learned image/title placeholders (present when a
    catalog has items without an image or title; CLIP-based PEFT only) in ``projector_per_group``."""
    config = clip_config(clip)
    with torch.device("meta"):
        model = ClipModel(config)
        frozen = _count(model)
        if peft == "iisan":
            text, vision = config.text_config, config.vision_config
            side = GroupedIISAN(1, text.hidden_size, vision.hidden_size, iisan_state_count(config))
            peft_per_group, multimodal_dim = _count(side), side.out_features
        else:
            model.requires_grad_(False)
            inject_adapters(model, peft, 1, GroupContext(), LoraSettings(rank=lora_rank))
            peft_per_group, multimodal_dim = _count(model, trainable_only=True), 2 * config.projection_dim
        width = config.projection_dim
        placeholders = (
            {"image": slice(0, width), "title": slice(width, 2 * width)}
            if missing_modalities and peft != "iisan"
            else None
        )
        recommender = Recommender(items, 1, multimodal_dim, hidden=hidden, maxlen=maxlen, placeholders=placeholders)
    projector = _count(recommender.projector) if recommender.projector is not None else 0
    sasrec = _count(recommender.sasrec)
    transductive = _count(recommender.item_embeddings) + _count(recommender.position_embeddings)
    return {
        "clip_frozen": frozen,
        "peft_per_group": peft_per_group,
        "projector_per_group": projector,
        "sasrec": sasrec,
        "transductive": transductive,
        "global_peft_total": peft_per_group + projector + sasrec + transductive,
        "perpeft_total": groups * (peft_per_group + projector) + sasrec + transductive,
    }


LARGE_TOLERANCE = 1_000  # paper §4.6.1: Large Global PEFT matches PerPEFT's count within ±10^3


def large_adapter_config(config: ResolvedConfig) -> tuple[ResolvedConfig, dict[str, int]]:
    """Large Global PEFT's settings and both adapter counts.

    LoRA's count is linear in the rank, so one adapter of rank C·r has exactly the count of PerPEFT's C
    adapters of rank r; alpha grows with it so the LoRA scaling alpha/r stays the paper's 2.0.
    """
    large = dataclasses.replace(
        config, lora_rank=config.groups * config.lora_rank, lora_alpha=config.groups * config.lora_alpha
    )
    per_group = parameter_counts(config.clip_model, "lora", 1, 1, lora_rank=config.lora_rank)["peft_per_group"]
    single = parameter_counts(config.clip_model, "lora", 1, 1, lora_rank=large.lora_rank)["peft_per_group"]
    counts = {"large_global_peft_adapter": single, "perpeft_adapters_total": config.groups * per_group}
    if abs(counts["large_global_peft_adapter"] - counts["perpeft_adapters_total"]) > LARGE_TOLERANCE:
        raise InputError(
            f"large-global-peft: no LoRA rank within ±{LARGE_TOLERANCE:,} parameters of PerPEFT ({counts})"
        )
    return large, counts
