"""Triton as the kernel modules import it: compiled with CUDA, interpreted (``TRITON_INTERPRET=1``) without.

Triton picks compiled or interpreted when ``@triton.jit`` decorates a function, reading
``TRITON_INTERPRET`` then. This package's kernels are decorated by :func:`jit`, which sets the variable to
1 for the decoration only, without CUDA and when the process has not set it: the rest of the process (other
packages' Triton, torch.compile) sees the environment it started with; :func:`launch` sets it again while an
interpreted kernel runs (the interpreter reads it then, too). Triton's own jit library (``tl.sum``,
``tl.cumsum``, ``tl.cdiv``, ``tl.sigmoid``...) was decorated when ``triton.language`` was first imported,
often by another package (transformers, peft, torch); the interpreter cannot call those compiled-mode
helpers, so they are re-imported here in interpreter mode. That only happens without CUDA (or with
``TRITON_INTERPRET=1`` set by hand), where compiled Triton cannot run anyway. ``TRITON_INTERPRET=0`` set by
hand keeps compiled mode without CUDA: kernels can then be compiled for a GPU target
(:mod:`perpeft.kernels.resources`), not run.

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
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "INTERPRETED",
    "KernelLaunch",
    "dot_precision",
    "jit",
    "launch",
    "recorded_launches",
    "target_programs",
    "tl",
    "triton",
]


# Whether this package's kernels run in Triton's interpreter: without CUDA unless the process set
# TRITON_INTERPRET itself (then as it says).
INTERPRETED = (
    bool(triton.knobs.runtime.interpret) if "TRITON_INTERPRET" in os.environ else not torch.cuda.is_available()
)


@contextlib.contextmanager
def _interpreter_mode() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` inside, where the process has no CUDA and did not set the variable itself."""
    if "TRITON_INTERPRET" in os.environ or torch.cuda.is_available():
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        del os.environ["TRITON_INTERPRET"]


def jit(fn: Any = None, **options: Any) -> Any:
    """``triton.jit`` (bare or with options) in this package's mode: interpreted without CUDA."""

    def decorate(function: Any) -> Any:
        with _interpreter_mode():
            return triton.jit(function, **options)

    return decorate if fn is None else decorate(fn)


with _interpreter_mode():
    if INTERPRETED and not isinstance(tl.standard.sum, InterpretedFunction):
        for module in (tl.standard, tl.random, tl):
            importlib.reload(module)


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
        with _interpreter_mode():  # the interpreter reads TRITON_INTERPRET while it runs, too
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
