"""Fused ops behind one dispatch each: Triton kernels for CUDA tensors, the PyTorch references otherwise.

``PERPEFT_KERNELS`` (read at every call) picks the path: ``auto`` (default) takes Triton for CUDA tensors
when Triton is installed and the reference otherwise, ``torch`` always takes the reference, ``triton``
always takes the kernels. The kernel modules (and Triton) are imported lazily, on the first call that
takes the Triton path, so the reference path needs no Triton. Without CUDA they are imported in Triton's
interpreter mode (``TRITON_INTERPRET=1`` set, see ``_triton.py``) and run on CPU tensors: exact, slow, for
tests. With CUDA they are compiled and need CUDA tensors, unless ``TRITON_INTERPRET=1`` was set before.
"""

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from . import reference
from .segments import GroupSegments

__all__ = ["bce_with_negatives", "grouped_ia3", "grouped_lora", "kernel_backend"]

_MODES = ("auto", "triton", "torch")


def kernel_backend(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the path the ops take for ``tensor`` under ``PERPEFT_KERNELS``."""
    mode = os.environ.get("PERPEFT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"PERPEFT_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    if mode == "auto":
        return "triton" if tensor.is_cuda and _triton_installed() else "torch"
    return mode


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels(name: str) -> ModuleType:
    """The Triton kernel module ``name`` (imported on first use)."""
    return importlib.import_module(f"{__package__}.{name}")


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    group_ids: torch.Tensor,
    scaling: float,
    *,
    segments: GroupSegments | None = None,
) -> torch.Tensor:
    """Row-wise ``scaling * (x[n] @ lora_a[g].T) @ lora_b[g].T`` with ``g = group_ids[n]``.

    ``x`` is ``[N, K]``, ``lora_a`` ``[C, R, K]``, ``lora_b`` ``[C, M, R]``, ``group_ids`` ``[N]`` in
    ``[0, C)``, in any order. ``segments`` (from :func:`~perpeft.kernels.segments.segment_groups`, once per
    batch) spares the Triton path its per-call sort; it must describe the same grouping as ``group_ids``.
    """
    if kernel_backend(x) == "torch":
        return reference.grouped_lora_reference(x, lora_a, lora_b, group_ids, scaling)
    return _kernels("lora").grouped_lora_triton(x, lora_a, lora_b, group_ids, scaling, segments=segments)


def grouped_ia3(
    x: torch.Tensor, scales: torch.Tensor, group_ids: torch.Tensor, *, segments: GroupSegments | None = None
) -> torch.Tensor:
    """``x * scales[group_ids]`` for ``x`` ``[N, K]`` and ``scales`` ``[C, K]``; ``segments`` as in grouped_lora."""
    if kernel_backend(x) == "torch":
        return reference.grouped_ia3_reference(x, scales, group_ids)
    return _kernels("ia3").grouped_ia3_triton(x, scales, group_ids, segments=segments)


def bce_with_negatives(h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of ``BCEWithLogits(h·pos, 1)`` plus masked mean of ``BCEWithLogits(h·neg, 0)``."""
    if kernel_backend(h) == "torch":
        return reference.bce_with_negatives_reference(h, pos, neg, mask)
    return _kernels("bce").bce_with_negatives_triton(h, pos, neg, mask)
