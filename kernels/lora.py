"""Grouped (multi-adapter) LoRA in Triton: segmented shrink/expand forward and a segmented backward.

Rows are visited in group-sorted order (:class:`~perpeft.kernels.segments.GroupSegments`); a row tile
never straddles two groups, so each program loads one adapter's weights. Tiles are located on the device
from the per-group counts (a prefix sum over ``C`` values), so the grid is sized from shapes alone
(``cdiv(N, BLOCK_M) + C`` tiles, the surplus exits at once) and no layer needs a host sync. When row
tiles alone cannot fill the device, the shrinks split K and the weight-gradient reductions split each
group's rows over more programs; their fp32 partials are added by one torch sum (deterministic, no atomics).

Every tensor a caller passes in is read through its own strides, so a transposed or sliced view costs no
copy, and the backward reads the weights transposed the same way (``lora_b.transpose(1, 2)`` is the
``[C, R, M]`` its shrink wants). Only the buffers allocated here are assumed contiguous.

Every ``tl.dot`` runs on operands upcast to fp32 with fp32 accumulation: for bf16/fp16 inputs TF32 is
exact on the upcast values (10 mantissa bits hold 7 or 10), for fp32 inputs IEEE keeps the reference's
precision. At LoRA ranks the kernels are bandwidth bound, so the slower TF32 MMA costs nothing that
matters, and it is the path Triton's interpreter computes correctly (it multiplies bf16 bit patterns).
Ranks below 16 are padded to 16 inside the kernels by masked loads; stored weights are never padded.
Triton compiles a binary per value of the constexprs and per class of the other integers (equal to 1,
divisible by 16, or neither). What varies from batch to batch is kept out of both, so the binaries depend
on the layer alone (widths, rank, dtype, strides, ``BLOCK_C`` from the group count) and no batch compiles
one mid-run: the row count ``N``, the rows per id ``T`` (titles are trimmed to each batch's longest, so
``T`` moves between batches) and the group and split counts are not specialised on (``do_not_specialize``),
and the row tile ``BLOCK_M`` is fixed, not sized from rows per group (a tile's rows past its group's end
are masked and load nothing). ``k_per_split`` stays specialised: always a multiple of ``BLOCK_K``, it falls
in one class at every batch. The strides are specialised (a unit stride keeps contiguous loads
vectorised); a contiguous input's strides are its layer's widths, the same at every batch.
"""

import torch

from ._triton import dot_precision, jit, launch, target_programs, tl, triton
from .segments import GroupSegments

_BLOCK_M = 64  # rows per tile at every batch size: sized from the batch, it compiled a binary per size
_BLOCK_K_SHRINK = 64
_BLOCK_N_EXPAND = 64
_BLOCK_WIDE = 128
# Every LoRA kernel spreads its tile over 8 warps: at 4 a thread held up to 246 registers (the fp32
# expand) and the fp32 weight-gradient reduction spilled 3 KB on sm_80, leaving 8-12 warps an SM; at 8
# (and 64-column expand tiles) every ViT-B/32 launch keeps >= 16 (benchmarks/RESULTS.md, "Kernel resources").
_NUM_WARPS = 8


@jit
def _locate_tile(tile, counts_ptr, rows_per_id, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Group of row tile ``tile`` and its [start, group end) in sorted row positions (group >= C: no tile)."""
    cs = tl.arange(0, BLOCK_C)
    rows = tl.load(counts_ptr + cs, mask=cs < C, other=0) * rows_per_id
    tiles = tl.cdiv(rows, BLOCK_M)
    ends = tl.cumsum(tiles, 0)
    group = tl.sum((ends <= tile).to(tl.int32), 0)
    here = cs == group
    first_tile = tl.sum(tl.where(here, ends - tiles, 0), 0)
    group_start = tl.sum(tl.where(cs < group, rows, 0), 0)
    group_end = group_start + tl.sum(tl.where(here, rows, 0), 0)
    return group, group_start + (tile - first_tile) * BLOCK_M, group_end


@jit
def _sorted_rows(positions, end, order_ptr, rows_per_id):
    """Input rows at sorted ``positions`` (token ``t`` of the ``i``-th sorted id) and their validity."""
    valid = positions < end
    ids = tl.load(order_ptr + positions // rows_per_id, mask=valid, other=0)
    return ids * rows_per_id + positions % rows_per_id, valid


@jit(do_not_specialize=["N", "C", "rows_per_id"])
def _shrink_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    order_ptr,
    counts_ptr,
    N,
    K,
    R,
    C,
    rows_per_id,
    stride_xn,
    stride_xk,
    stride_wg,
    stride_wr,
    stride_wk,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out[split, n, :R] = x[n, k-split] @ w[g(n), :R, k-split].T`` for one row tile and one K split."""
    group, start, end = _locate_tile(tl.program_id(0), counts_ptr, rows_per_id, C, BLOCK_M, BLOCK_C)
    if group < C:
        split = tl.program_id(1)
        rows, valid = _sorted_rows(start + tl.arange(0, BLOCK_M), end, order_ptr, rows_per_id)
        rr = tl.arange(0, BLOCK_R)
        x_base = x_ptr + rows[:, None] * stride_xn
        w_base = w_ptr + group.to(tl.int64) * stride_wg + rr[None, :] * stride_wr
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(split * k_per_split, (split + 1) * k_per_split, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_base + ks[None, :] * stride_xk, mask=valid[:, None] & (ks[None, :] < K), other=0.0)
            w = tl.load(w_base + ks[:, None] * stride_wk, mask=(rr[None, :] < R) & (ks[:, None] < K), other=0.0)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        out = out_ptr + split.to(tl.int64) * N * R + rows[:, None] * R + rr[None, :]
        tl.store(out, acc, mask=valid[:, None] & (rr[None, :] < R))


@jit(do_not_specialize=["C", "rows_per_id"])
def _expand_kernel(
    s_ptr,
    w_ptr,
    out_ptr,
    order_ptr,
    counts_ptr,
    M,
    R,
    C,
    rows_per_id,
    scaling,
    stride_sn,
    stride_sr,
    stride_wg,
    stride_wm,
    stride_wr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out[n, m-block] = scaling * s[n, :R] @ w[g(n), m-block, :R].T`` for one row tile."""
    group, start, end = _locate_tile(tl.program_id(0), counts_ptr, rows_per_id, C, BLOCK_M, BLOCK_C)
    if group < C:
        rows, valid = _sorted_rows(start + tl.arange(0, BLOCK_M), end, order_ptr, rows_per_id)
        rr = tl.arange(0, BLOCK_R)
        ms = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        s_ptrs = s_ptr + rows[:, None] * stride_sn + rr[None, :] * stride_sr
        s = tl.load(s_ptrs, mask=valid[:, None] & (rr[None, :] < R), other=0.0)
        w_ptrs = w_ptr + group.to(tl.int64) * stride_wg + rr[:, None] * stride_wr + ms[None, :] * stride_wm
        w = tl.load(w_ptrs, mask=(rr[:, None] < R) & (ms[None, :] < M), other=0.0)
        acc = tl.dot(s.to(tl.float32), w.to(tl.float32), input_precision=PRECISION) * scaling
        out = out_ptr + rows[:, None] * M + ms[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (ms[None, :] < M))


@jit(do_not_specialize=["C", "rows_per_id", "num_splits"])
def _segment_outer_kernel(
    p_ptr,
    q_ptr,
    out_ptr,
    order_ptr,
    offsets_ptr,
    WIDTH_P,
    WIDTH_Q,
    C,
    rows_per_id,
    scaling,
    num_splits,
    stride_pn,
    stride_pw,
    stride_qn,
    stride_qw,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``out[split, g, p-block, q-block] = scaling * sum_{n in g, this split} p[n, :] q[n, :]``."""
    group = tl.program_id(0)
    tiles_q = tl.cdiv(WIDTH_Q, BLOCK_Q)
    pp = (tl.program_id(1) // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    qq = (tl.program_id(1) % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    split = tl.program_id(2)
    start = tl.load(offsets_ptr + group) * rows_per_id
    end = tl.load(offsets_ptr + group + 1) * rows_per_id
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for first in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):
        rows, valid = _sorted_rows(first + tl.arange(0, BLOCK_M), end, order_ptr, rows_per_id)
        p_ptrs = p_ptr + rows[None, :] * stride_pn + pp[:, None] * stride_pw
        p = tl.load(p_ptrs, mask=valid[None, :] & (pp[:, None] < WIDTH_P), other=0.0)
        q_ptrs = q_ptr + rows[:, None] * stride_qn + qq[None, :] * stride_qw
        q = tl.load(q_ptrs, mask=valid[:, None] & (qq[None, :] < WIDTH_Q), other=0.0)
        acc = tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision=PRECISION)
    out = out_ptr + ((split * C + group).to(tl.int64) * WIDTH_P + pp[:, None]) * WIDTH_Q + qq[None, :]
    tl.store(out, acc * scaling, mask=(pp[:, None] < WIDTH_P) & (qq[None, :] < WIDTH_Q))


def _block_for(width: int) -> int:
    """Tile size along a reduced-over-rows output dimension: the padded rank, or wide-layer tiles."""
    return min(_BLOCK_WIDE, max(16, triton.next_power_of_2(width)))


class _Launch:
    """Launch geometry shared by one op's kernels: row tiling, padded rank and the segments' tensors."""

    def __init__(self, segments: GroupSegments, num_rows: int, rank: int, device: torch.device) -> None:
        self.segments = segments
        self.num_rows = num_rows
        self.rows_per_id = segments.rows_per_id(num_rows)
        self.rank = rank
        self.block_r = max(16, triton.next_power_of_2(rank))
        self.block_c = max(16, triton.next_power_of_2(segments.num_groups))
        self.num_tiles = triton.cdiv(num_rows, _BLOCK_M) + segments.num_groups
        self.target = target_programs(device)

    def shrink(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``[N, R]`` fp32: ``x[n] @ w[g(n)].T`` for ``w`` ``[C, R, K]``."""
        width = x.shape[1]
        k_blocks = triton.cdiv(width, _BLOCK_K_SHRINK)
        splits = max(1, min(k_blocks, self.target // self.num_tiles))
        k_per_split = triton.cdiv(k_blocks, splits) * _BLOCK_K_SHRINK
        splits = triton.cdiv(width, k_per_split)
        out = x.new_empty((splits, self.num_rows, self.rank), dtype=torch.float32)
        launch(
            _shrink_kernel,
            (self.num_tiles, splits),
            x,
            w,
            out,
            self.segments.order,
            self.segments.counts,
            self.num_rows,
            width,
            self.rank,
            self.segments.num_groups,
            self.rows_per_id,
            *x.stride(),
            *w.stride(),
            k_per_split,
            BLOCK_M=_BLOCK_M,
            BLOCK_R=self.block_r,
            BLOCK_K=_BLOCK_K_SHRINK,
            BLOCK_C=self.block_c,
            PRECISION=dot_precision(x, w),
            num_warps=_NUM_WARPS,
        )
        return out[0] if splits == 1 else out.sum(0)

    def expand(self, s: torch.Tensor, w: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """``[N, W]`` in ``dtype``: ``scaling * s[n] @ w[g(n)].T`` for ``s`` ``[N, R]`` and ``w`` ``[C, W, R]``."""
        width = w.shape[1]
        out = s.new_empty((self.num_rows, width), dtype=dtype)
        grid = (self.num_tiles, triton.cdiv(width, _BLOCK_N_EXPAND))
        launch(
            _expand_kernel,
            grid,
            s,
            w,
            out,
            self.segments.order,
            self.segments.counts,
            width,
            self.rank,
            self.segments.num_groups,
            self.rows_per_id,
            scaling,
            *s.stride(),
            *w.stride(),
            BLOCK_M=_BLOCK_M,
            BLOCK_R=self.block_r,
            BLOCK_N=_BLOCK_N_EXPAND,
            BLOCK_C=self.block_c,
            PRECISION=dot_precision(s, w),
            num_warps=_NUM_WARPS,
        )
        return out

    def segment_outer(self, p: torch.Tensor, q: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """``[C, P, Q]`` in ``dtype``: per group, ``scaling * p[rows].T @ q[rows]`` (fp32 accumulation)."""
        groups, width_p, width_q = self.segments.num_groups, p.shape[1], q.shape[1]
        block_p, block_q = _block_for(width_p), _block_for(width_q)
        tiles = triton.cdiv(width_p, block_p) * triton.cdiv(width_q, block_q)
        row_blocks = triton.cdiv(self.num_rows, _BLOCK_M)
        splits = max(1, min(row_blocks, self.target // (groups * tiles)))
        out = p.new_empty((splits, groups, width_p, width_q), dtype=torch.float32)
        launch(
            _segment_outer_kernel,
            (groups, tiles, splits),
            p,
            q,
            out,
            self.segments.order,
            self.segments.offsets,
            width_p,
            width_q,
            groups,
            self.rows_per_id,
            scaling,
            splits,
            *p.stride(),
            *q.stride(),
            BLOCK_M=_BLOCK_M,
            BLOCK_P=block_p,
            BLOCK_Q=block_q,
            PRECISION=dot_precision(p, q),
            num_warps=_NUM_WARPS,
        )
        return (out[0] if splits == 1 else out.sum(0)).to(dtype)


def grouped_lora_forward(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, segments: GroupSegments, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, shrunk)``: ``out`` ``[N, M]`` in ``x.dtype`` and ``shrunk`` ``[N, R]`` fp32, the unscaled
    ``x[n] @ lora_a[g].T`` that the backward reads for ``lora_b``'s gradient. Shapes are the caller's to check."""
    launch = _Launch(segments, x.shape[0], lora_a.shape[1], x.device)
    shrunk = launch.shrink(x, lora_a)
    return launch.expand(shrunk, lora_b, scaling, x.dtype), shrunk


def grouped_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    shrunk: torch.Tensor,
    segments: GroupSegments,
    scaling: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``x``, ``lora_a`` and ``lora_b`` in their dtypes, each ``None`` unless ``needs`` asks for it."""
    launch = _Launch(segments, x.shape[0], lora_a.shape[1], x.device)
    need_x, need_a, need_b = needs
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        # dS = dY @ B[g] (B read as [C, R, M]); dX = scaling * dS @ A[g] (A read as [C, K, R]).
        grad_shrunk = launch.shrink(grad_out, lora_b.transpose(1, 2))
        if need_x:
            grad_x = launch.expand(grad_shrunk, lora_a.transpose(1, 2), scaling, x.dtype)
        if need_a:
            grad_a = launch.segment_outer(grad_shrunk, x, scaling, lora_a.dtype)
    if need_b:
        grad_b = launch.segment_outer(grad_out, shrunk, scaling, lora_b.dtype)
    return grad_x, grad_a, grad_b
