"""Fused ops as registered operators: Triton kernels for CUDA tensors, the PyTorch references otherwise.

Each public function checks shapes on the host and calls one ``torch.library`` operator
(``perpeft::grouped_lora``, ``perpeft::grouped_ia3``, ``perpeft::bce_with_negatives``) with a fake
implementation (output shapes and dtypes, for tracing) and a registered autograd formula; the LoRA and
(IA)3 backwards are operators too (``perpeft::grouped_lora_backward``, ``perpeft::grouped_ia3_backward``),
BCE's is a multiply. torch.compile therefore captures each op as one node forward and one backward, and
the host-side decisions inside an operator (the path, the one group CPU ids share, the per-call sort when
no segments are passed) are taken when it runs, never while tracing. ``segments=`` reaches the operators
as its three tensors. Every output is a new contiguous tensor, as the fake implementations declare, and a
gradient not asked for is an empty stand-in (an operator returns tensors, not ``None``).

``PERPEFT_KERNELS`` (read at every call, also by compiled graphs) picks the path: ``auto`` (default) takes
Triton for CUDA tensors when Triton is installed and the reference otherwise, ``torch`` always takes the
reference, ``triton`` always takes the kernels. The reference path runs outside autocast, as the kernels
do, so its outputs have the dtypes the fake implementations declare. The kernel modules (and Triton) are
imported lazily, on the first call that takes the Triton path, so the reference path needs no Triton.
Outside torch.compile, a call on the reference path runs the reference directly, differentiated by autograd
(``_eager_reference``): the operator's dispatch (the custom-op and autograd wrappers, in Python) costs
0.45–0.8 ms a call forward and backward, as much as the reference's arithmetic on a CPU item batch of the
small CLIPs, and there is nothing for an operator to hide from a graph that is not being traced. The
written-out backward is the one the operator registers, pinned to autograd's by ``tests/kernels/test_ops.py``.
Without CUDA they are imported in Triton's interpreter mode (``TRITON_INTERPRET=1`` set, see
``_triton.py``) and run on CPU tensors: exact, slow, for tests. With CUDA they are compiled and need CUDA
tensors, unless ``TRITON_INTERPRET=1`` was set before.
"""

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import reference
from .segments import GroupSegments, segment_groups

__all__ = ["bce_with_negatives", "grouped_ia3", "grouped_lora", "kernel_backend", "kernels_mode"]

_MODES = ("auto", "triton", "torch")


def kernels_mode() -> str:
    """``PERPEFT_KERNELS``, checked: ``auto`` (unset), ``triton`` or ``torch``."""
    mode = os.environ.get("PERPEFT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"PERPEFT_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def kernel_backend(tensor: Tensor) -> str:
    """``"triton"`` or ``"torch"``: the path the ops take for ``tensor`` under ``PERPEFT_KERNELS``."""
    mode = kernels_mode()
    if mode == "auto":
        return "triton" if tensor.is_cuda and _triton_installed() else "torch"
    return mode


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _eager_reference(tensor: Tensor) -> bool:
    """Whether a call on ``tensor`` runs the reference directly: the reference path, outside torch.compile."""
    return not torch.compiler.is_compiling() and kernel_backend(tensor) == "torch"


def _kernels(name: str) -> ModuleType:
    """The Triton kernel module ``name`` (imported on first use)."""
    return importlib.import_module(f"{__package__}.{name}")


def _without_autocast(tensor: Tensor) -> contextlib.AbstractContextManager:
    if not torch.amp.is_autocast_available(tensor.device.type):  # the meta device (host-sync counts)
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


def _segments(
    group_ids: Tensor, groups: int, order: Tensor | None, counts: Tensor | None, offsets: Tensor | None
) -> GroupSegments:
    """The caller's segments from their tensors, or the rows segmented here (one sort)."""
    if order is None or counts is None or offsets is None:
        return segment_groups(group_ids, groups)
    return GroupSegments(order, counts, offsets, groups)


def _segment_tensors(segments: GroupSegments | None, groups: int, rows: int) -> tuple[Tensor | None, ...]:
    """``segments`` as the operators take them, after checking they fit ``groups`` groups and ``rows`` rows."""
    if segments is None:
        return None, None, None
    if segments.num_groups != groups:
        raise ValueError(f"segments cover {segments.num_groups} groups, the adapter stacks {groups}")
    segments.rows_per_id(rows)  # raises unless the rows split evenly over the segmented ids
    return segments.order, segments.counts, segments.offsets


def _dense(grads: Sequence[Tensor | None], inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Each gradient contiguous in its input's dtype, an empty stand-in where it was not asked for."""
    return tuple(
        like.new_empty(0) if grad is None else grad.to(like.dtype).contiguous()
        for grad, like in zip(grads, inputs, strict=True)
    )


def _fake_grads(inputs: Sequence[Tensor], needs: Sequence[bool]) -> tuple[Tensor, ...]:
    return tuple(like.new_empty(like.shape if need else (0,)) for like, need in zip(inputs, needs, strict=True))


@torch.library.custom_op("perpeft::grouped_lora", mutates_args=())
def _grouped_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    group_ids: Tensor,
    order: Tensor | None,
    counts: Tensor | None,
    offsets: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """``(out, shrunk)``: the op's output and the fp32 ``[N, R]`` rows ``x[n] @ lora_a[g].T`` its backward reads."""
    if kernel_backend(x) == "torch":
        with _without_autocast(x):
            out, shrunk = reference.grouped_lora_forward(x, lora_a, lora_b, group_ids, scaling)
        return out.contiguous(), shrunk.contiguous()
    segments = _segments(group_ids, lora_a.shape[0], order, counts, offsets)
    return _kernels("lora").grouped_lora_forward(x, lora_a, lora_b, segments, scaling)


@_grouped_lora.register_fake
def _grouped_lora_fake(x: Tensor, lora_a: Tensor, lora_b: Tensor, *_: Any) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], lora_b.shape[1]), x.new_empty(x.shape[0], lora_a.shape[1], dtype=torch.float32)


@torch.library.custom_op("perpeft::grouped_lora_backward", mutates_args=())
def _grouped_lora_backward(
    grad_out: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    shrunk: Tensor,
    group_ids: Tensor,
    order: Tensor | None,
    counts: Tensor | None,
    offsets: Tensor | None,
    scaling: float,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``x``, ``lora_a`` and ``lora_b`` (empty where ``need_*`` is false)."""
    needs = (need_x, need_a, need_b)
    if kernel_backend(x) == "torch":
        with _without_autocast(x):
            grads = reference.grouped_lora_backward(grad_out, x, lora_a, lora_b, shrunk, group_ids, scaling, needs)
    else:
        segments = _segments(group_ids, lora_a.shape[0], order, counts, offsets)
        grads = _kernels("lora").grouped_lora_backward(grad_out, x, lora_a, lora_b, shrunk, segments, scaling, needs)
    grad_x, grad_a, grad_b = _dense(grads, (x, lora_a, lora_b))
    return grad_x, grad_a, grad_b


@_grouped_lora_backward.register_fake
def _grouped_lora_backward_fake(
    grad_out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, *args: Any
) -> tuple[Tensor, ...]:
    return _fake_grads((x, lora_a, lora_b), args[-3:])


def _grouped_lora_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, lora_a, lora_b, group_ids, order, counts, offsets, scaling = inputs
    ctx.save_for_backward(x, lora_a, lora_b, output[1], group_ids, order, counts, offsets)
    ctx.scaling = scaling
    ctx.mark_non_differentiable(output[1])


def _grouped_lora_grad(ctx: Any, grad_out: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
    needs = ctx.needs_input_grad[:3]
    grads = _grouped_lora_backward(grad_out, *ctx.saved_tensors, ctx.scaling, *needs)
    return *(grad if need else None for grad, need in zip(grads, needs, strict=True)), None, None, None, None, None


_grouped_lora.register_autograd(_grouped_lora_grad, setup_context=_grouped_lora_setup)


def grouped_lora(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    group_ids: Tensor,
    scaling: float,
    *,
    segments: GroupSegments | None = None,
) -> Tensor:
    """Row-wise ``scaling * (x[n] @ lora_a[g].T) @ lora_b[g].T`` with ``g = group_ids[n]``.

    ``x`` is ``[N, K]``, ``lora_a`` ``[C, R, K]``, ``lora_b`` ``[C, M, R]``, ``group_ids`` ``[N]`` in
    ``[0, C)``, in any order. ``segments`` (from :func:`~perpeft.kernels.segments.segment_groups`, once per
    batch) spares the Triton path its per-call sort; it must describe the same grouping as ``group_ids``.
    """
    groups, rank, width_in = lora_a.shape
    if x.dim() != 2 or x.shape[1] != width_in or lora_b.shape[0] != groups or lora_b.shape[2] != rank:
        raise ValueError(
            f"grouped_lora shapes: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    order, counts, offsets = _segment_tensors(segments, groups, x.shape[0])
    if _eager_reference(x):
        with _without_autocast(x):
            return reference.grouped_lora_reference(x, lora_a, lora_b, group_ids, float(scaling))
    return _grouped_lora(x, lora_a, lora_b, group_ids, order, counts, offsets, float(scaling))[0]


@torch.library.custom_op("perpeft::grouped_ia3", mutates_args=())
def _grouped_ia3(
    x: Tensor, scales: Tensor, group_ids: Tensor, order: Tensor | None, counts: Tensor | None, offsets: Tensor | None
) -> Tensor:
    """``x * scales[group_ids]`` in the promoted dtype; the segments serve the backward only."""
    if kernel_backend(x) == "torch":
        with _without_autocast(x):
            return reference.grouped_ia3_reference(x, scales, group_ids).contiguous()
    return _kernels("ia3").grouped_ia3_forward(x, scales, group_ids)


@_grouped_ia3.register_fake
def _grouped_ia3_fake(x: Tensor, scales: Tensor, *_: Any) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, scales.dtype))


@torch.library.custom_op("perpeft::grouped_ia3_backward", mutates_args=())
def _grouped_ia3_backward(
    grad_out: Tensor,
    x: Tensor,
    scales: Tensor,
    group_ids: Tensor,
    order: Tensor | None,
    counts: Tensor | None,
    offsets: Tensor | None,
    need_x: bool,
    need_scales: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``x`` and ``scales`` (empty where ``need_*`` is false)."""
    needs = (need_x, need_scales)
    if kernel_backend(x) == "torch":
        with _without_autocast(x):
            grads = reference.grouped_ia3_backward(grad_out, x, scales, group_ids, needs)
    else:
        segments = None if order is None else _segments(group_ids, scales.shape[0], order, counts, offsets)
        grads = _kernels("ia3").grouped_ia3_backward(grad_out, x, scales, group_ids, segments, needs)
    grad_x, grad_scales = _dense(grads, (x, scales))
    return grad_x, grad_scales


@_grouped_ia3_backward.register_fake
def _grouped_ia3_backward_fake(grad_out: Tensor, x: Tensor, scales: Tensor, *args: Any) -> tuple[Tensor, ...]:
    return _fake_grads((x, scales), args[-2:])


def _grouped_ia3_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_ia3_grad(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    needs = ctx.needs_input_grad[:2]
    grads = _grouped_ia3_backward(grad_out, *ctx.saved_tensors, *needs)
    return *(grad if need else None for grad, need in zip(grads, needs, strict=True)), None, None, None, None


_grouped_ia3.register_autograd(_grouped_ia3_grad, setup_context=_grouped_ia3_setup)


def grouped_ia3(x: Tensor, scales: Tensor, group_ids: Tensor, *, segments: GroupSegments | None = None) -> Tensor:
    """``x * scales[group_ids]`` for ``x`` ``[N, K]`` and ``scales`` ``[C, K]``; ``segments`` as in grouped_lora."""
    if x.dim() != 2 or scales.dim() != 2 or x.shape[1] != scales.shape[1] or group_ids.shape != x.shape[:1]:
        raise ValueError(
            f"grouped_ia3 shapes: x {tuple(x.shape)}, scales {tuple(scales.shape)}, ids {tuple(group_ids.shape)}"
        )
    tensors = _segment_tensors(segments, scales.shape[0], x.shape[0])
    if _eager_reference(x):
        with _without_autocast(x):
            return reference.grouped_ia3_reference(x, scales, group_ids).contiguous()
    return _grouped_ia3(x, scales, group_ids, *tensors)


@torch.library.custom_op("perpeft::bce_with_negatives", mutates_args=())
def _bce_with_negatives(
    h: Tensor, pos: Tensor, neg: Tensor, mask: Tensor, need_h: bool, need_pos: bool, need_neg: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss and, computed with it, the gradients of ``h``, ``pos``, ``neg`` for a ``grad_output`` of 1
    (empty where ``need_*`` is false)."""
    needs = (need_h, need_pos, need_neg)
    if kernel_backend(h) == "torch":
        with _without_autocast(h):
            loss, grads = reference.bce_with_negatives_forward(h, pos, neg, mask, needs)
    else:
        loss, grads = _kernels("bce").bce_with_negatives_forward(h, pos, neg, mask, needs)
    grad_h, grad_pos, grad_neg = _dense(grads, (h, pos, neg))
    return loss.to(h.dtype), grad_h, grad_pos, grad_neg


@_bce_with_negatives.register_fake
def _bce_with_negatives_fake(h: Tensor, pos: Tensor, neg: Tensor, mask: Tensor, *needs: bool) -> tuple[Tensor, ...]:
    return h.new_empty(()), *_fake_grads((h, pos, neg), needs)


def _bce_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _bce_grad(ctx: Any, grad_loss: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
    needs = ctx.needs_input_grad[:3]
    grads = (grad * grad_loss if need else None for grad, need in zip(ctx.saved_tensors, needs, strict=True))
    return *grads, None, None, None, None


_bce_with_negatives.register_autograd(_bce_grad, setup_context=_bce_setup)


def bce_with_negatives(h: Tensor, pos: Tensor, neg: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of ``BCEWithLogits(h·pos, 1)`` plus masked mean of ``BCEWithLogits(h·neg, 0)``."""
    if h.dim() != 2 or pos.shape != h.shape or neg.shape != h.shape or mask.shape != h.shape[:1]:
        raise ValueError(
            f"bce_with_negatives shapes: h {tuple(h.shape)}, pos {tuple(pos.shape)}, "
            f"neg {tuple(neg.shape)}, mask {tuple(mask.shape)}"
        )
    if _eager_reference(h):
        with _without_autocast(h):
            return reference.bce_with_negatives_reference(h, pos, neg, mask.bool()).to(h.dtype)
    needs = [torch.is_grad_enabled() and t.requires_grad for t in (h, pos, neg)]
    return _bce_with_negatives(h, pos, neg, mask.bool(), *needs)[0]
