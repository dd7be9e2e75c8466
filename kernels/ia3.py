"""Grouped (IA)3 in Triton: a fused gather-and-scale forward and a one-pass segmented backward.

The forward reads each row's group id and scales it by that group's vector in a single pass, in any
row order. The backward walks rows in group-sorted order (:class:`~perpeft.kernels.segments.GroupSegments`):
each program owns one group and one column block, keeps that group's scales in registers, writes
``dx = grad_out * scales[g]`` and accumulates ``dscales[g] = sum(x * grad_out)`` in fp32 from the same
loads, so ``x`` and ``grad_out`` are read once for both gradients.

Triton compiles a binary per value of the constexprs and per class of the other integers (equal to 1,
divisible by 16, or neither). The row count ``N``, the rows per id ``T`` (titles are trimmed to each
batch's longest, so ``T`` moves between batches) and the group and split counts are not specialised on
(``do_not_specialize``) and the block sizes are fixed, so the binaries depend on the layer alone (width,
dtype, whether ``dx`` is written) and no batch compiles one mid-run.
"""

from typing import Any

import torch

from ._triton import jit, launch, target_programs, tl, triton
from .segments import GroupSegments, segment_groups

_BLOCK_M = 32
_BLOCK_K = 128


@jit(do_not_specialize=["N"])
def _scale_rows_kernel(x_ptr, scales_ptr, ids_ptr, out_ptr, N, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[n, k] = x[n, k] * scales[ids[n], k]`` for one row block and one column block."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    groups = tl.load(ids_ptr + rows, mask=rows < N, other=0)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
    s = tl.load(scales_ptr + groups[:, None] * K + cols[None, :], mask=mask, other=0.0)
    out = x.to(tl.float32) * s.to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["C", "rows_per_id", "num_splits"])
def _backward_kernel(
    x_ptr,
    grad_ptr,
    scales_ptr,
    grad_x_ptr,
    grad_scales_ptr,
    order_ptr,
    offsets_ptr,
    C,
    K,
    rows_per_id,
    num_splits,
    WRITE_GRAD_X: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One group, one column block, one split of its rows: ``dx`` rows and a partial ``dscales[g]``."""
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    start = tl.load(offsets_ptr + group) * rows_per_id
    end = tl.load(offsets_ptr + group + 1) * rows_per_id
    s = tl.load(scales_ptr + group * K + cols, mask=cols < K, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for first in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):
        positions = first + tl.arange(0, BLOCK_M)
        valid = positions < end
        ids = tl.load(order_ptr + positions // rows_per_id, mask=valid, other=0)
        offs = (ids * rows_per_id + positions % rows_per_id)[:, None] * K + cols[None, :]
        mask = valid[:, None] & (cols[None, :] < K)
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x * grad, 0)
        if WRITE_GRAD_X:
            tl.store(grad_x_ptr + offs, (grad * s[None, :]).to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_scales_ptr + (split * C + group).to(tl.int64) * K + cols, acc, mask=cols < K)


def _scale_rows(x: torch.Tensor, scales: torch.Tensor, group_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, width = x.shape
    out = x.new_empty((rows, width), dtype=dtype)
    grid = (triton.cdiv(rows, _BLOCK_M), triton.cdiv(width, _BLOCK_K))
    launch(_scale_rows_kernel, grid, x, scales, group_ids, out, rows, width, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K)
    return out


class _GroupedIA3(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,  # the autograd context (torch types it Any): carries what forward keeps for backward
        x: torch.Tensor,
        scales: torch.Tensor,
        group_ids: torch.Tensor,
        segments: GroupSegments | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, scales, group_ids)
        ctx.segments = segments
        return _scale_rows(x, scales, group_ids, torch.promote_types(x.dtype, scales.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scales, group_ids = ctx.saved_tensors
        need_x, need_scales = ctx.needs_input_grad[:2]
        grad_out = grad_out.contiguous()
        if not need_scales:
            return (_scale_rows(grad_out, scales, group_ids, x.dtype) if need_x else None), None, None, None
        groups, width = scales.shape
        segments = ctx.segments or segment_groups(group_ids, groups)
        rows_per_id = segments.rows_per_id(x.shape[0])
        column_blocks = triton.cdiv(width, _BLOCK_K)
        row_blocks = triton.cdiv(x.shape[0], _BLOCK_M)
        splits = max(1, min(row_blocks, target_programs(x.device) // (groups * column_blocks)))
        grad_x = torch.empty_like(x) if need_x else None
        partial = x.new_empty((splits, groups, width), dtype=torch.float32)
        launch(
            _backward_kernel,
            (groups, column_blocks, splits),
            x,
            grad_out,
            scales,
            grad_x if need_x else x,
            partial,
            segments.order,
            segments.offsets,
            groups,
            width,
            rows_per_id,
            splits,
            WRITE_GRAD_X=need_x,
            BLOCK_M=_BLOCK_M,
            BLOCK_K=_BLOCK_K,
        )
        grad_scales = (partial[0] if splits == 1 else partial.sum(0)).to(scales.dtype)
        return grad_x, grad_scales, None, None


def grouped_ia3_triton(
    x: torch.Tensor, scales: torch.Tensor, group_ids: torch.Tensor, *, segments: GroupSegments | None = None
) -> torch.Tensor:
    """Triton ``grouped_ia3``: output in the promoted dtype of x and scales, gradients in their inputs' dtypes."""
    if x.dim() != 2 or scales.dim() != 2 or x.shape[1] != scales.shape[1] or group_ids.shape != x.shape[:1]:
        raise ValueError(
            f"grouped_ia3 shapes: x {tuple(x.shape)}, scales {tuple(scales.shape)}, ids {tuple(group_ids.shape)}"
        )
    if segments is not None and segments.num_groups != scales.shape[0]:
        raise ValueError(f"segments cover {segments.num_groups} groups, scales has {scales.shape[0]}")
    return _GroupedIA3.apply(x.contiguous(), scales.contiguous(), group_ids.contiguous(), segments)
