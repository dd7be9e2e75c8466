"""Device and precision policy: which device a run uses, whether SASRec compiles, host-to-device copies."""

import torch


def compiles_sasrec(setting: str, device: torch.device) -> bool:
    """``auto`` compiles SASRec on CUDA only: on CPU the first compile (~30 s) outweighs the gain."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def uses_bf16_autocast(precision: str, device: torch.device) -> bool:
    """bf16 autocast for ``--precision auto`` or ``bf16`` on CUDA; fp32 everywhere else (``fp32``, and any
    CPU: its bf16 GEMMs are no faster there)."""
    return device.type == "cuda" and precision in ("auto", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: on CUDA copied from pinned memory without blocking the host (a copy
    from pageable memory would wait for it); any other tensor with a plain ``to``."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
