"""Tensors on disk: safetensors files with JSON metadata, written atomically and checked when read; optimizer
state as flat tensors."""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from perpeft.engine.errors import InputError, first_line
from perpeft.engine.runtime.atomic import atomic_write_bytes


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic, fsynced safetensors write; ``metadata`` (JSON-able) rides in the header under the key ``json``."""
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata={"json": json.dumps(metadata or {})}))


def load_tensors(
    path: Path, expected: Mapping[str, Sequence[int] | None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a file `save_tensors` wrote. InputError naming ``path`` when it is missing,
    damaged (cut short, not safetensors) or lacks a key of ``expected`` (name → shape, None for any shape)
    or has it in another shape."""
    if not path.is_file():
        raise InputError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("json", "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: damaged or unreadable ({first_line(error)})") from None
    for name, shape in (expected or {}).items():
        if name not in tensors:
            raise InputError(f"{path}: lacks {name!r}: not a file of this run, or damaged")
        if shape is not None and tuple(tensors[name].shape) != tuple(shape):
            raise InputError(
                f"{path}: {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}: "
                "not a file of this run"
            )
    return tensors, metadata


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat tensors plus its JSON-able parameter groups (no pickle)."""
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, state["param_groups"]


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
