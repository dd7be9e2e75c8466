"""Triton as the kernel modules import it: compiled with CUDA, interpreted (``TRITON_INTERPRET=1``) without.

Triton picks compiled or interpreted when ``@triton.jit`` decorates a function, reading
``TRITON_INTERPRET`` then. Its own jit library (``tl.sum``, ``tl.cumsum``, ``tl.cdiv``, ``tl.sigmoid``...)
was decorated when ``triton.language`` was first imported, often by another package (transformers, peft,
torch) before the variable was set; the interpreter cannot call those compiled-mode helpers, so they are
re-imported here in interpreter mode. That only happens without CUDA (or with ``TRITON_INTERPRET=1`` set
by hand), where compiled Triton cannot run anyway.
"""

import functools
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Imported after TRITON_INTERPRET is settled.
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

if triton.knobs.runtime.interpret and not isinstance(tl.standard.sum, InterpretedFunction):
    for module in (tl.standard, tl.random, tl):
        importlib.reload(module)

__all__ = ["dot_precision", "target_programs", "tl", "triton"]


@functools.lru_cache
def target_programs(device: torch.device) -> int:
    """Programs a launch should offer to fill the device: 4 per SM on CUDA, a few under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def dot_precision(*tensors: torch.Tensor) -> str:
    """``tl.dot`` input precision: IEEE when every operand is fp32, TF32 (exact on 16-bit values) otherwise."""
    return "ieee" if all(t.dtype == torch.float32 for t in tensors) else "tf32"
