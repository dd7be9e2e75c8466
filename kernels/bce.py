"""Fused BCE-with-negatives in Triton: loss and all three input gradients in one forward kernel.

With ``lp = h·pos``, ``ln = h·neg`` and ``w = mask / max(mask.sum(), 1)`` the loss is
``sum(w * (softplus(-lp) + softplus(ln)))``, so ``dlp = (sigmoid(lp) - 1) * w``, ``dln = sigmoid(ln) * w``
and ``dh = dlp * pos + dln * neg``, ``dpos = dlp * h``, ``dneg = dln * h``. The forward kernel writes
those gradients next to the loss (as Liger-Kernel's fused cross-entropy does); the backward only scales
them by ``grad_output``. ``h``, ``pos``, ``neg`` and ``mask`` are read through their own strides.

The row count ``N`` changes with the batch and is not specialised on (``do_not_specialize``), and the
tile is sized from the width alone, so a batch of another size never compiles another binary.
"""

import torch

from ._triton import jit, launch, tl, triton

_MAX_BLOCK_D = 1024
_TILE_ELEMENTS = 4096  # per program and input: 8 warps hold three fp32 tiles in 48 registers a thread


@jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@jit(do_not_specialize=["N"])
def _bce_kernel(
    h_ptr,
    pos_ptr,
    neg_ptr,
    mask_ptr,
    count_ptr,
    loss_ptr,
    grad_h_ptr,
    grad_pos_ptr,
    grad_neg_ptr,
    N,
    D,
    stride_hn,
    stride_hd,
    stride_pn,
    stride_pd,
    stride_nn,
    stride_nd,
    stride_mask,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRAD_H: tl.constexpr,
    GRAD_POS: tl.constexpr,
    GRAD_NEG: tl.constexpr,
):
    """One block of rows: its share of the loss and, for the inputs that need them, its gradient rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    mask_values = tl.load(mask_ptr + rows * stride_mask, mask=in_range, other=0)
    weight = (mask_values != 0).to(tl.float32) / tl.load(count_ptr)
    row = rows[:, None].to(tl.int64)
    h_rows = h_ptr + row * stride_hn
    pos_rows = pos_ptr + row * stride_pn
    neg_rows = neg_ptr + row * stride_nn
    pos_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    neg_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        mask = in_range[:, None] & (cols < D)
        h = tl.load(h_rows + cols * stride_hd, mask=mask, other=0.0).to(tl.float32)
        pos = tl.load(pos_rows + cols * stride_pd, mask=mask, other=0.0).to(tl.float32)
        neg = tl.load(neg_rows + cols * stride_nd, mask=mask, other=0.0).to(tl.float32)
        pos_logit += tl.sum(h * pos, 1)
        neg_logit += tl.sum(h * neg, 1)
    tl.store(loss_ptr + pid, tl.sum(weight * (_softplus(-pos_logit) + _softplus(neg_logit)), 0))
    if GRAD_H or GRAD_POS or GRAD_NEG:
        grad_pos_logit = (tl.sigmoid(pos_logit) - 1.0) * weight
        grad_neg_logit = tl.sigmoid(neg_logit) * weight
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)[None, :]
            mask = in_range[:, None] & (cols < D)
            out = row * D + cols  # the gradients are allocated contiguous
            h = tl.load(h_rows + cols * stride_hd, mask=mask, other=0.0).to(tl.float32)
            if GRAD_H:
                pos = tl.load(pos_rows + cols * stride_pd, mask=mask, other=0.0).to(tl.float32)
                neg = tl.load(neg_rows + cols * stride_nd, mask=mask, other=0.0).to(tl.float32)
                grad_h = grad_pos_logit[:, None] * pos + grad_neg_logit[:, None] * neg
                tl.store(grad_h_ptr + out, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
            if GRAD_POS:
                grad_pos = grad_pos_logit[:, None] * h
                tl.store(grad_pos_ptr + out, grad_pos.to(grad_pos_ptr.dtype.element_ty), mask=mask)
            if GRAD_NEG:
                grad_neg = grad_neg_logit[:, None] * h
                tl.store(grad_neg_ptr + out, grad_neg.to(grad_neg_ptr.dtype.element_ty), mask=mask)


def bce_with_negatives_forward(
    h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor, needs: tuple[bool, bool, bool]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The loss (0-d, ``h.dtype``) and the gradients of ``h``, ``pos``, ``neg`` (for a ``grad_output`` of 1,
    in their dtypes), each ``None`` unless ``needs`` asks for it. ``mask`` is bool ``[N]``."""
    rows, width = h.shape
    grads = [t.new_empty(t.shape) if need else None for t, need in zip((h, pos, neg), needs, strict=True)]
    block_d = min(_MAX_BLOCK_D, triton.next_power_of_2(width))
    block_n = min(64, max(1, _TILE_ELEMENTS // block_d))
    programs = triton.cdiv(rows, block_n)
    count = mask.sum(dtype=torch.float32).clamp_min(1.0)
    partial = h.new_empty(programs, dtype=torch.float32)
    launch(
        _bce_kernel,
        (programs,),
        h,
        pos,
        neg,
        mask.view(torch.uint8),
        count,
        partial,
        *(g if g is not None else h for g in grads),
        rows,
        width,
        *h.stride(),
        *pos.stride(),
        *neg.stride(),
        mask.stride(0),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        GRAD_H=needs[0],
        GRAD_POS=needs[1],
        GRAD_NEG=needs[2],
        num_warps=8,
    )
    return partial.sum().to(h.dtype), grads
