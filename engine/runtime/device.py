"""Device and precision policy: which device a run uses, whether SASRec compiles, copies between host and device."""

from dataclasses import dataclass

import torch

from perpeft.engine.runtime.distributed import launched_by_torchrun, rank_gpu


def compiles_sasrec(setting: str, device: torch.device) -> bool:
    """``auto`` compiles SASRec on CUDA only: on CPU the first compile (~30 s) outweighs the gain."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def uses_bf16_autocast(precision: str, device: torch.device) -> bool:
    """bf16 autocast for ``--precision auto`` or ``bf16`` on CUDA; fp32 everywhere else (``fp32``, and any
    CPU: its bf16 GEMMs are no faster there)."""
    return device.type == "cuda" and precision in ("auto", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present. Under ``torchrun`` a numbered GPU (a run's stored ``cuda:N``, resumed
    or embedded with several ranks) is checked against the ranks' own GPUs (`rank_gpu`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and launched_by_torchrun():
        return torch.device("cuda", rank_gpu(name))
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: to an accelerator copied without waiting (on
    CUDA from pinned memory: a copy from pageable memory would wait for it); a CPU target or a tensor
    already on a device with a plain ``to``."""
    if device.type == "cpu" or tensor.device.type != "cpu":
        return tensor.to(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass(frozen=True)
class HostCopy:
    """A device tensor's copy to the host, started without waiting for the device: on CUDA into pinned
    memory behind an event, so the host can go on queueing work; `result` waits for the copy to land."""

    tensor: torch.Tensor
    landed: torch.cuda.Event | None

    @classmethod
    def start(cls, tensor: torch.Tensor) -> "HostCopy":
        if tensor.device.type != "cuda":
            return cls(tensor.cpu(), None)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        return cls(host, landed)

    def result(self) -> torch.Tensor:
        if self.landed is not None:
            self.landed.synchronize()
        return self.tensor
