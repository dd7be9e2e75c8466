"""Tensors on disk: safetensors files with JSON metadata, written atomically; optimizer state as flat tensors."""

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from perpeft.engine.errors import InputError
from perpeft.engine.runtime.atomic import temporary_file_beside


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic safetensors write; ``metadata`` (JSON-able) rides in the header under the key ``json``."""
    temporary = temporary_file_beside(path)
    try:
        mode = temporary.stat().st_mode  # 0666 less the umask; safetensors replaces the file by a private one
        contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        save_file(contiguous, temporary, metadata={"json": json.dumps(metadata or {})})
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"{path}: checkpoint missing")
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("json", "{}"))
    return load_file(str(path)), metadata


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
