"""PyTorch references of the fused ops: the CPU path and the ground truth for every Triton kernel."""

import torch
import torch.nn.functional as F

from .segments import shared_group


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
    groups, rank, in_features = lora_a.shape
    out_features = lora_b.shape[1]
    shared = shared_group(group_ids, groups)
    if shared is not None:
        return ((x @ lora_a[shared].T) * scaling) @ lora_b[shared].T
    shrunk = (x @ lora_a.reshape(groups * rank, in_features).T).view(-1, groups, rank)
    keep = shrunk.new_zeros(shrunk.shape[0], groups, 1).scatter_(1, group_ids.view(-1, 1, 1), scaling)
    expand = lora_b.permute(0, 2, 1).reshape(groups * rank, out_features)
    return (shrunk * keep).view(-1, groups * rank) @ expand


def grouped_ia3_reference(x: torch.Tensor, scales: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``x * scales[group_ids]``: each row scaled by its group's (IA)3 vector."""
    shared = shared_group(group_ids, scales.shape[0])
    if shared is not None:
        return x * scales[shared]
    return x * scales[group_ids]


def bce_with_negatives_reference(
    h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Masked mean of ``BCEWithLogits(h·pos, 1)`` plus masked mean of ``BCEWithLogits(h·neg, 0)``."""
    weight = mask.to(h.dtype)
    count = weight.sum().clamp_min(1.0)
    pos_logits = (h * pos).sum(-1)
    neg_logits = (h * neg).sum(-1)
    return (F.softplus(-pos_logits) * weight).sum() / count + (F.softplus(neg_logits) * weight).sum() / count
