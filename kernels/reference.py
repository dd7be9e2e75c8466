"""PyTorch references of the fused ops: the CPU path and the ground truth for every Triton kernel."""

import torch
import torch.nn.functional as F


def grouped_lora_reference(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, group_ids: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Row-wise ``scaling * (x[n] @ lora_a[g].T) @ lora_b[g].T`` with ``g = group_ids[n]``.

    All groups are shrunk in one matmul (``[N, C*R]``), the other groups' columns are zeroed, and one
    matmul expands: two dense GEMMs and no loop over groups, so a mixed-group batch costs what a
    single adapter costs plus ``C*R`` extra columns.
    """
    groups, rank, in_features = lora_a.shape
    out_features = lora_b.shape[1]
    shrunk = x @ lora_a.reshape(groups * rank, in_features).T
    if groups > 1:
        keep = F.one_hot(group_ids, groups).to(shrunk.dtype)
        shrunk = (shrunk.view(-1, groups, rank) * keep[:, :, None]).view(-1, groups * rank)
    expand = lora_b.permute(0, 2, 1).reshape(groups * rank, out_features)
    return (shrunk @ expand) * scaling


def grouped_ia3_reference(x: torch.Tensor, scales: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``x * scales[group_ids]``: each row scaled by its group's (IA)3 vector."""
    if scales.shape[0] == 1:
        return x * scales[0]
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
