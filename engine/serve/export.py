"""One group's CLIP adapter as a Hugging Face ``peft`` adapter directory.

Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft`` saves them, so that
``PeftModel.from_pretrained(CLIPModel, ADIR)`` loads the group's LoRA or (IA)3 weights. The names are
peft's: ``base_model.model.<module path>.lora_A.weight`` ``[r, in]``, ``….lora_B.weight`` ``[out, r]``,
``….ia3_l`` ``[out, 1]`` (k_proj, v_proj: output scaling) or ``[1, in]`` (fc1: input scaling). Only the
adapter leaves: the group's projector, ID embeddings and SASRec are not part of CLIP.
"""

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from perpeft.engine.clip.tiny import TINY_CLIP_DIR
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.model.encoders import IA3_INPUT_TARGETS, IA3_OUTPUT_TARGETS, LORA_TARGETS, require_clip_adapters
from perpeft.engine.runtime.atomic import atomic_write_bytes, atomic_write_json
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.tensors import load_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ENCODER_PREFIX = "encoder.clip."
PEFT_PREFIX = "base_model.model."
PEFT_LIBRARY_TYPES = {"lora": "LORA", "ia3": "IA3"}  # peft's names of our adapter types
CLIP_CLASS = {"base_model_class": "CLIPModel", "parent_library": "transformers.models.clip.modeling_clip"}


def adapter_config(config: RunConfig) -> dict[str, Any]:
    """The run's adapter settings in peft's ``adapter_config.json`` fields (absent ones take peft's defaults)."""
    common = {
        "auto_mapping": CLIP_CLASS,
        "base_model_name_or_path": str(TINY_CLIP_DIR) if config.clip == "tiny" else config.clip,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "peft_type": PEFT_LIBRARY_TYPES[config.peft],
        "revision": None,
        "task_type": None,
    }
    if config.peft == "lora":
        return {
            **common,
            "bias": "none",
            "init_lora_weights": True,
            "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "r": config.lora_rank,
            "target_modules": sorted(LORA_TARGETS),
            "use_dora": False,
            "use_rslora": False,
        }
    return {
        **common,
        "feedforward_modules": sorted(IA3_INPUT_TARGETS),
        "init_ia3_weights": True,
        "target_modules": sorted(IA3_OUTPUT_TARGETS + IA3_INPUT_TARGETS),
    }


def adapter_tensors(state: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """Group ``group``'s slice of every grouped adapter parameter in ``state``, under peft's names."""
    tensors = {}
    for name, value in state.items():
        if not name.startswith(ENCODER_PREFIX):
            continue
        module, _, kind = name.removeprefix(ENCODER_PREFIX).rpartition(".")
        weight = value[group].contiguous()
        if kind in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{module}.{kind}.weight"] = weight
        elif kind == "ia3_l":
            feedforward = module.rpartition(".")[2] in IA3_INPUT_TARGETS
            tensors[f"{PEFT_PREFIX}{module}.ia3_l"] = weight.view(1, -1) if feedforward else weight.view(-1, 1)
    return tensors


def export_adapter(path: Path, group: int, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write group ``group``'s adapter of the finished run at ``path`` to ``out``; returns its config.

    Refuses runs whose PEFT has no peft equivalent (IISAN, or no adapter at all) and a non-empty ``out``
    unless ``overwrite`` (which replaces the two files and leaves anything else in ``out``).
    """
    run = RunDirectory.open(path)
    checkpoint = run.best_checkpoint("perpeft")
    config = run.config
    require_clip_adapters(run.path, config.peft, "export as a Hugging Face peft adapter")
    if not 0 <= group < config.groups:
        raise InputError(f"--group {group}: the run has groups 0..{config.groups - 1}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: exists and is not empty; pass --overwrite to replace the adapter files")
    tensors = adapter_tensors(load_tensors(checkpoint)[0], group)
    settings = adapter_config(config)
    atomic_write_bytes(out / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / ADAPTER_CONFIG, settings)
    return settings
