"""Fused BCE-with-negatives in Triton: loss and all three input gradients in one forward kernel.

With ``lp = h·pos``, ``ln = h·neg`` and ``w = mask / max(mask.sum(), 1)`` the loss is
``sum(w * (softplus(-lp) + softplus(ln)))``, so ``dlp = (sigmoid(lp) - 1) * w``, ``dln = sigmoid(ln) * w``
and ``dh = dlp * pos + dln * neg``, ``dpos = dlp * h``, ``dneg = dln * h``. The forward kernel writes
those gradients next to the loss; the backward only scales them by ``grad_output``, in place (as
Liger-Kernel's fused cross-entropy does), so the graph can be walked backward once.

The row count ``N`` changes with the batch and is not specialised on (``do_not_specialize``), and the
tile is sized from the width alone, so a batch of another size never compiles another binary.
"""

from typing import Any

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
    weight = (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0).to(tl.float32) / tl.load(count_ptr)
    row_offs = rows[:, None].to(tl.int64) * D
    pos_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    neg_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = in_range[:, None] & (cols[None, :] < D)
        h = tl.load(h_ptr + row_offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + row_offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        neg = tl.load(neg_ptr + row_offs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pos_logit += tl.sum(h * pos, 1)
        neg_logit += tl.sum(h * neg, 1)
    tl.store(loss_ptr + pid, tl.sum(weight * (_softplus(-pos_logit) + _softplus(neg_logit)), 0))
    if GRAD_H or GRAD_POS or GRAD_NEG:
        grad_pos_logit = (tl.sigmoid(pos_logit) - 1.0) * weight
        grad_neg_logit = tl.sigmoid(neg_logit) * weight
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = in_range[:, None] & (cols[None, :] < D)
            offs = row_offs + cols[None, :]
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if GRAD_H:
                pos = tl.load(pos_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                neg = tl.load(neg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                grad_h = grad_pos_logit[:, None] * pos + grad_neg_logit[:, None] * neg
                tl.store(grad_h_ptr + offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
            if GRAD_POS:
                grad_pos = grad_pos_logit[:, None] * h
                tl.store(grad_pos_ptr + offs, grad_pos.to(grad_pos_ptr.dtype.element_ty), mask=mask)
            if GRAD_NEG:
                grad_neg = grad_neg_logit[:, None] * h
                tl.store(grad_neg_ptr + offs, grad_neg.to(grad_neg_ptr.dtype.element_ty), mask=mask)


class _BCEWithNegatives(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,  # the autograd context (torch types it Any): carries what forward keeps for backward
        h: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        mask: torch.Tensor,
        need: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        rows, width = h.shape
        grads = [torch.empty_like(t) if n else None for t, n in zip((h, pos, neg), need, strict=True)]
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
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            GRAD_H=need[0],
            GRAD_POS=need[1],
            GRAD_NEG=need[2],
            num_warps=8,
        )
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.need = need
        return partial.sum().to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Scaling in place bumps the saved tensors' versions: a second backward through this node fails
        # in autograd's version check instead of returning gradients scaled twice.
        saved = iter(ctx.saved_tensors)
        grads = [next(saved).mul_(grad_loss) if n else None for n in ctx.need]
        return *grads, None, None


def bce_with_negatives_triton(
    h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Triton ``bce_with_negatives``: the loss in ``h.dtype``; gradients precomputed in the inputs' dtypes."""
    if h.dim() != 2 or pos.shape != h.shape or neg.shape != h.shape or mask.shape != h.shape[:1]:
        raise ValueError(
            f"bce_with_negatives shapes: h {tuple(h.shape)}, pos {tuple(pos.shape)}, "
            f"neg {tuple(neg.shape)}, mask {tuple(mask.shape)}"
        )
    need = tuple(torch.is_grad_enabled() and t.requires_grad for t in (h, pos, neg))
    return _BCEWithNegatives.apply(h.contiguous(), pos.contiguous(), neg.contiguous(), mask.contiguous().bool(), need)
