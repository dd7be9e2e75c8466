"""The run directory: config, progress state, metrics and safetensors checkpoints, all written atomically."""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .errors import InputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic safetensors write; ``metadata`` (JSON-able) rides in the header under the key ``json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        save_file(contiguous, temporary, metadata={"json": json.dumps(metadata or {})})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
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


class RunDirectory:
    """A run on disk: ``config.json``, ``state.json`` (progress), ``metrics.json`` and checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: Path, config: RunConfig, overwrite: bool) -> "RunDirectory":
        """A new run; an existing non-empty directory is refused unless ``overwrite``."""
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if not overwrite:
                raise InputError(
                    f"{path}: run directory exists; pass --overwrite to replace it or --resume to continue"
                )
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_bytes(path / "config.json", (config.to_json() + "\n").encode())
        return run

    @classmethod
    def open(cls, path: Path) -> "RunDirectory":
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a run directory (no config.json)")
        return cls(path)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_json_file(self.path / "config.json")

    def read_state(self) -> dict[str, Any]:
        state_path = self.path / "state.json"
        return json.loads(state_path.read_text()) if state_path.is_file() else {}

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.path / "state.json", state)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.path / "metrics.json", metrics)

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``, written when the run finishes; InputError before that."""
        path = self.path / "metrics.json"
        if not path.is_file():
            raise InputError(f"{self.path}: run not finished (no metrics.json); finish it with `train --resume`")
        return json.loads(path.read_text())

    def best_checkpoint(self, stage: str) -> Path:
        """The selected best-epoch weights of ``stage`` ("global" or "perpeft") of a finished run."""
        metrics = self.read_metrics()
        if stage not in metrics:
            raise InputError(
                f"{self.path}: a --method {metrics.get('method')} run has no {stage} stage "
                "(embed, evaluate, recommend and export serve PerPEFT runs)"
            )
        return self.file(f"{stage}/best.safetensors")

    def file(self, name: str) -> Path:
        return self.path / name
