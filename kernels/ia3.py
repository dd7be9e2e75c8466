"""Grouped (IA)3 in Triton: a fused gather-and-scale forward and a one-pass segmented backward.

The forward reads each row's group id and scales it by that group's vector in a single pass, in any
row order. The backward walks rows in group-sorted order (:class:`~perpeft.kernels.segments.GroupSegments`):
each program owns one group and one column block, keeps that group's scales in registers, writes
``dx = grad_out * scales[g]`` and accumulates ``dscales[g] = sum(x * grad_out)`` in fp32 from the same
loads, so ``x`` and ``grad_out`` are read once for both gradients. Every tensor a caller passes in is read
through its own strides (a view costs no copy); only the buffers allocated here are assumed contiguous.

Triton compiles a binary per value of the constexprs and per class of the other integers (equal to 1,
divisible by 16, or neither). The row count ``N``, the rows per id ``T`` (titles are trimmed to each
batch's longest, so ``T`` moves between batches) and the group and split counts are not specialised on
(``do_not_specialize``) and the block sizes are fixed, so the binaries depend on the layer alone (width,
dtype, strides, whether ``dx`` is written) and no batch compiles one mid-run.
"""

import torch

from ._triton import jit, launch, target_programs, tl, triton
from .segments import GroupSegments, segment_groups

_BLOCK_M = 32
_BLOCK_K = 128


@jit(do_not_specialize=["N"])
def _scale_rows_kernel(
    x_ptr,
    scales_ptr,
    ids_ptr,
    out_ptr,
    N,
    K,
    stride_xn,
    stride_xk,
    stride_sg,
    stride_sk,
    stride_id,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[n, k] = x[n, k] * scales[ids[n], k]`` for one row block and one column block."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    groups = tl.load(ids_ptr + rows * stride_id, mask=rows < N, other=0)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + cols[None, :] * stride_xk, mask=mask, other=0.0)
    s = tl.load(scales_ptr + groups[:, None] * stride_sg + cols[None, :] * stride_sk, mask=mask, other=0.0)
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
    stride_xn,
    stride_xk,
    stride_gn,
    stride_gk,
    stride_sg,
    stride_sk,
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
    s = tl.load(scales_ptr + group * stride_sg + cols * stride_sk, mask=cols < K, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for first in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):
        positions = first + tl.arange(0, BLOCK_M)
        valid = positions < end
        ids = tl.load(order_ptr + positions // rows_per_id, mask=valid, other=0)
        rows = (ids * rows_per_id + positions % rows_per_id)[:, None]
        mask = valid[:, None] & (cols[None, :] < K)
        grad = tl.load(grad_ptr + rows * stride_gn + cols[None, :] * stride_gk, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows * stride_xn + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x * grad, 0)
        if WRITE_GRAD_X:
            grad_x = (grad * s[None, :]).to(grad_x_ptr.dtype.element_ty)
            tl.store(grad_x_ptr + rows * K + cols[None, :], grad_x, mask=mask)
    tl.store(grad_scales_ptr + (split * C + group).to(tl.int64) * K + cols, acc, mask=cols < K)


def grouped_ia3_forward(
    x: torch.Tensor, scales: torch.Tensor, group_ids: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x * scales[group_ids]`` in ``dtype`` (default: the promoted dtype of ``x`` and ``scales``)."""
    rows, width = x.shape
    out = x.new_empty((rows, width), dtype=dtype or torch.promote_types(x.dtype, scales.dtype))
    grid = (triton.cdiv(rows, _BLOCK_M), triton.cdiv(width, _BLOCK_K))
    launch(
        _scale_rows_kernel,
        grid,
        x,
        scales,
        group_ids,
        out,
        rows,
        width,
        *x.stride(),
        *scales.stride(),
        group_ids.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_K=_BLOCK_K,
    )
    return out


def grouped_ia3_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    scales: torch.Tensor,
    group_ids: torch.Tensor,
    segments: GroupSegments | None,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x`` and ``scales`` in their dtypes, each ``None`` unless ``needs`` asks for it;
    ``segments`` (``None``: sorted here) only serve the scales' gradient."""
    need_x, need_scales = needs
    if not need_scales:
        return (grouped_ia3_forward(grad_out, scales, group_ids, x.dtype) if need_x else None), None
    groups, width = scales.shape
    segments = segments or segment_groups(group_ids, groups)
    rows_per_id = segments.rows_per_id(x.shape[0])
    column_blocks = triton.cdiv(width, _BLOCK_K)
    row_blocks = triton.cdiv(x.shape[0], _BLOCK_M)
    splits = max(1, min(row_blocks, target_programs(x.device) // (groups * column_blocks)))
    grad_x = x.new_empty(x.shape) if need_x else None
    partial = x.new_empty((splits, groups, width), dtype=torch.float32)
    launch(
        _backward_kernel,
        (groups, column_blocks, splits),
        x,
        grad_out,
        scales,
        grad_x if grad_x is not None else x,
        partial,
        segments.order,
        segments.offsets,
        groups,
        width,
        rows_per_id,
        splits,
        *x.stride(),
        *grad_out.stride(),
        *scales.stride(),
        WRITE_GRAD_X=need_x,
        BLOCK_M=_BLOCK_M,
        BLOCK_K=_BLOCK_K,
    )
    grad_scales = (partial[0] if splits == 1 else partial.sum(0)).to(scales.dtype)
    return grad_x, grad_scales
