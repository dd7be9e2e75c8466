"""PyTorch references of the fused ops: the ground truth for every Triton kernel, and the ops' path without them.

``grouped_lora_reference``, ``grouped_ia3_reference`` and ``bce_with_negatives_reference`` are the ground
truth, differentiated by autograd. The registered ops (:mod:`perpeft.kernels.ops`) run the same arithmetic
where the kernels do not, through the ``*_forward`` and ``*_backward`` functions here: an op's gradient is
its registered backward, not autograd's record of what ran inside it, so those write the gradients out.
``silu_mlp_reference`` is the ground truth of :mod:`perpeft.kernels.frozen`'s oneDNN MLP.
"""

import torch
import torch.nn.functional as F

from .segments import shared_group


def _own_group_scaling(group_ids: torch.Tensor, groups: int, scaling: float, like: torch.Tensor) -> torch.Tensor:
    """``[N, C, 1]``: ``scaling`` at each row's own group, 0 at the others."""
    return like.new_zeros(group_ids.shape[0], groups, 1).scatter_(1, group_ids.view(-1, 1, 1), scaling)


def _in_group(like: torch.Tensor, group: int, value: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``like`` (stacked per-group parameters) with ``value`` as group ``group``'s slice."""
    grad = like.new_zeros(like.shape)
    grad[group] = value
    return grad


def _shrink(x: torch.Tensor, lora_a: torch.Tensor, shared: int | None) -> torch.Tensor:
    """The unscaled rank-space rows of ``x``: ``[N, R]`` through the ``shared`` group's ``A``, else every
    group's ``[N, C, R]`` in one GEMM."""
    if shared is not None:
        return x @ lora_a[shared].T
    groups, rank, in_features = lora_a.shape
    return (x @ lora_a.reshape(groups * rank, in_features).T).view(-1, groups, rank)


def expand_ranks(ranks: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``ranks @ lora_b.T``: rank-space rows ``[..., R]`` through one group's ``B`` ``[M, R]``. ``B.T`` is made
    contiguous (``R·M`` values) so that autograd forms ``B``'s gradient as the ``[R, N]·[N, M]`` GEMM; from
    the transposed view it takes the transpose of ``[M, N]·[N, R]``, whose skinny output MKL computes about
    three times slower on the CPU."""
    return ranks @ lora_b.T.contiguous()


def _own_rank_rows(every: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each row's own group's ``[N, R]`` slice of every group's rank-space rows ``[N, C, R]``."""
    rank = every.shape[2]
    return every.gather(1, group_ids.view(-1, 1, 1).expand(-1, 1, rank)).view(-1, rank)


def _lora_rows(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, group_ids: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """:func:`grouped_lora_reference`'s output, the rank-space rows it expanded (``[N, R]`` for a batch of one
    shared group, else every group's ``[N, C, R]``), and that shared group."""
    groups, rank, _ = lora_a.shape
    out_features = lora_b.shape[1]
    shared = shared_group(group_ids, groups)
    shrunk = _shrink(x, lora_a, shared)
    if shared is not None:
        return expand_ranks(shrunk * scaling, lora_b[shared]), shrunk, shared
    keep = _own_group_scaling(group_ids, groups, scaling, shrunk)
    expand = lora_b.permute(0, 2, 1).reshape(groups * rank, out_features)
    return (shrunk * keep).view(-1, groups * rank) @ expand, shrunk, None


def grouped_lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``[N, R]``: row-wise ``x[n] @ lora_a[g].T`` with ``g = group_ids[n]`` (unscaled), the rank-space rows
    :func:`grouped_lora_reference` expands; for a caller that mixes rows before expanding them."""
    shared = shared_group(group_ids, lora_a.shape[0])
    shrunk = _shrink(x, lora_a, shared)
    return shrunk if shared is not None else _own_rank_rows(shrunk, group_ids)


def grouped_lora_forward(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, group_ids: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, shrunk)``: :func:`grouped_lora_reference`'s output and the fp32 ``[N, R]`` rank-space rows
    ``x[n] @ lora_a[g].T`` (unscaled) that :func:`grouped_lora_backward` reads for ``lora_b``'s gradient."""
    out, rows, shared = _lora_rows(x, lora_a, lora_b, group_ids, scaling)
    if shared is None:
        rows = _own_rank_rows(rows, group_ids)
    return out, rows.float()


def grouped_lora_reference(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, group_ids: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Row-wise ``scaling * (x[n] @ lora_a[g].T) @ lora_b[g].T`` with ``g = group_ids[n]``.

    When all rows share one group, that group's two matmuls. Otherwise all groups are shrunk in one
    matmul (``[N, C*R]``), each row's columns of other groups are zeroed (and its own scaled) by one
    multiply with a ``[N, C]`` mask, and one matmul expands: two dense GEMMs and no loop over groups,
    so a mixed-group batch costs what a single adapter costs plus ``C*R`` extra columns. ``scaling``
    is always applied to the rank-sized intermediate, never to the ``[N, M]`` output.
    """
    return _lora_rows(x, lora_a, lora_b, group_ids, scaling)[0]


def grouped_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    shrunk: torch.Tensor,
    group_ids: torch.Tensor,
    scaling: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients autograd takes through :func:`grouped_lora_reference` for ``x``, ``lora_a`` and
    ``lora_b``, each ``None`` unless ``needs`` asks for it; ``shrunk`` is :func:`grouped_lora_forward`'s."""
    groups, rank, in_features = lora_a.shape
    out_features = lora_b.shape[1]
    need_x, need_a, need_b = needs
    shrunk = shrunk.to(grad_out.dtype)
    shared = shared_group(group_ids, groups)
    if shared is not None:
        grad_shrunk = (grad_out @ lora_b[shared]) * scaling
        return (
            grad_shrunk @ lora_a[shared] if need_x else None,
            _in_group(lora_a, shared, grad_shrunk.T @ x) if need_a else None,
            _in_group(lora_b, shared, ((shrunk * scaling).T @ grad_out).T) if need_b else None,  # see expand_ranks
        )
    keep = _own_group_scaling(group_ids, groups, scaling, grad_out)
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        expand = lora_b.permute(0, 2, 1).reshape(groups * rank, out_features)
        grad_every = ((grad_out @ expand.T).view(-1, groups, rank) * keep).view(-1, groups * rank)
        if need_x:
            grad_x = grad_every @ lora_a.reshape(groups * rank, in_features)
        if need_a:
            grad_a = (grad_every.T @ x).view(groups, rank, in_features)
    if need_b:
        spread = (shrunk.unsqueeze(1) * keep).view(-1, groups * rank)
        grad_b = (spread.T @ grad_out).view(groups, rank, out_features).transpose(1, 2)
    return grad_x, grad_a, grad_b


def grouped_ia3_reference(x: torch.Tensor, scales: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``x * scales[group_ids]``: each row scaled by its group's (IA)3 vector."""
    shared = shared_group(group_ids, scales.shape[0])
    if shared is not None:
        return x * scales[shared]
    return x * scales[group_ids]


def grouped_ia3_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    scales: torch.Tensor,
    group_ids: torch.Tensor,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients autograd takes through :func:`grouped_ia3_reference` for ``x`` and ``scales``, each
    ``None`` unless ``needs`` asks for it."""
    need_x, need_scales = needs
    shared = shared_group(group_ids, scales.shape[0])
    grad_x = grad_scales = None
    if need_x:
        grad_x = (grad_out * (scales[shared] if shared is not None else scales[group_ids])).to(x.dtype)
    if need_scales:
        products = (grad_out * x).to(scales.dtype)
        if shared is not None:
            grad_scales = _in_group(scales, shared, products.sum(0))
        else:
            grad_scales = scales.new_zeros(scales.shape).index_add_(0, group_ids, products)
    return grad_x, grad_scales


def bce_with_negatives_forward(
    h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor, needs: tuple[bool, bool, bool]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """:func:`bce_with_negatives_reference`'s loss and its gradients for ``h``, ``pos`` and ``neg`` (for a
    ``grad_output`` of 1), each ``None`` unless ``needs`` asks for it."""
    weight = mask.to(h.dtype)
    count = weight.sum().clamp_min(1.0)
    pos_logits = (h * pos).sum(-1)
    neg_logits = (h * neg).sum(-1)
    loss = (F.softplus(-pos_logits) * weight).sum() / count + (F.softplus(neg_logits) * weight).sum() / count
    if not any(needs):
        return loss, [None, None, None]
    grad_pos_logits = (-torch.sigmoid(-pos_logits) * weight / count).unsqueeze(-1)
    grad_neg_logits = (torch.sigmoid(neg_logits) * weight / count).unsqueeze(-1)
    need_h, need_pos, need_neg = needs
    return loss, [
        grad_pos_logits * pos + grad_neg_logits * neg if need_h else None,
        grad_pos_logits * h if need_pos else None,
        grad_neg_logits * h if need_neg else None,
    ]


def bce_with_negatives_reference(
    h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Masked mean of ``BCEWithLogits(h·pos, 1)`` plus masked mean of ``BCEWithLogits(h·neg, 0)``."""
    return bce_with_negatives_forward(h, pos, neg, mask, (False, False, False))[0]


def silu_mlp_reference(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
) -> torch.Tensor:
    """``fc2(SiLU(fc1(x)))``: CLIP's MLP with its QuickGELU folded into SiLU."""
    return F.linear(F.silu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
