"""Triton as the kernel modules import it: compiled with CUDA, interpreted (``TRITON_INTERPRET=1``) without.

Triton picks compiled or interpreted when ``@triton.jit`` decorates a function, reading
``TRITON_INTERPRET`` then. Its own jit library (``tl.sum``, ``tl.cumsum``, ``tl.cdiv``, ``tl.sigmoid``...)
was decorated when ``triton.language`` was first imported, often by another package (transformers, peft,
torch) before the variable was set; the interpreter cannot call those compiled-mode helpers, so they are
re-imported here in interpreter mode. That only happens without CUDA (or with ``TRITON_INTERPRET=1`` set
by hand), where compiled Triton cannot run anyway. ``TRITON_INTERPRET=0`` set by hand keeps compiled
mode without CUDA: kernels can then be compiled for a GPU target (:mod:`perpeft.kernels.resources`),
not run.

Every wrapper launches through :func:`launch`, so :func:`recorded_launches` can collect the launches an
op issues, exactly as it issues them, without running a kernel.
"""

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Imported after TRITON_INTERPRET is settled.
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

if triton.knobs.runtime.interpret and not isinstance(tl.standard.sum, InterpretedFunction):
    for module in (tl.standard, tl.random, tl):
        importlib.reload(module)

__all__ = ["KernelLaunch", "dot_precision", "launch", "recorded_launches", "target_programs", "tl", "triton"]


@dataclass(frozen=True)
class KernelLaunch:
    """One launch as a wrapper issues it: ``kernel[grid](*args, **options)``."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    options: dict[str, Any]
    """Constexprs by name, and ``num_warps`` / ``num_stages`` where the wrapper sets them."""


@dataclass
class _Recording:
    launches: list[KernelLaunch]
    programs: int


_recording: _Recording | None = None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)``; inside :func:`recorded_launches`, recorded instead of run."""
    if _recording is None:
        kernel[grid](*args, **options)
    else:
        _recording.launches.append(KernelLaunch(kernel, grid, args, options))


@contextlib.contextmanager
def recorded_launches(programs: int) -> Iterator[list[KernelLaunch]]:
    """Collect the launches issued inside instead of running them (outputs stay uninitialised), with
    :func:`target_programs` answering ``programs`` for every device, as a GPU with ``programs / 4`` SMs
    would. Not thread-safe: for tools that plan launches on CPU tensors, not for training."""
    global _recording
    if _recording is not None:
        raise RuntimeError("recorded_launches does not nest")
    _recording = _Recording([], programs)
    try:
        yield _recording.launches
    finally:
        _recording = None


def target_programs(device: torch.device) -> int:
    """Programs a launch should offer to fill the device: 4 per SM on CUDA, a few under the interpreter."""
    if _recording is not None:
        return _recording.programs
    return _device_programs(device)


@functools.lru_cache
def _device_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def dot_precision(*tensors: torch.Tensor) -> str:
    """``tl.dot`` input precision: IEEE when every operand is fp32, TF32 (exact on 16-bit values) otherwise."""
    return "ieee" if all(t.dtype == torch.float32 for t in tensors) else "tf32"
