"""Maximum-inner-product search in per-group item tables (paper App. D.2): one index per group.

`ExactIndex` scores every item of a query's group table (the default: Beauty's 8 × 31,151 × 32 floats are
~32 MB, and one query is a ``[I] × d`` product). Each query excludes its own items (history and any asked
exclusions) before the top-K, so a query never gets back what it bought.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Hits:
    """One query's top-K: engine item indices (≥ 1), best first, and their inner products."""

    items: list[int]
    scores: list[float]


class ExactIndex:
    """Exact top-K by inner product over item tables ``[C, I+1, d]`` (row 0, padding, never returned)."""

    def __init__(self, tables: torch.Tensor) -> None:
        self.tables = tables

    @property
    def num_items(self) -> int:
        return self.tables.shape[1] - 1

    def search(
        self, vectors: torch.Tensor, groups: torch.Tensor, k: Sequence[int], exclude: Sequence[np.ndarray]
    ) -> list[Hits]:
        """The ``k[n]`` best items of group ``groups[n]``'s table for each query vector ``vectors[n]``, the
        items of ``exclude[n]`` (engine indices, repeats allowed) left out; fewer when fewer remain."""
        hits: list[Hits | None] = [None] * vectors.shape[0]
        for group in torch.unique(groups).tolist():
            rows = (groups == group).nonzero().squeeze(1).tolist()
            scores = vectors[rows] @ self.tables[group, 1:].T
            for row, row_scores in zip(rows, scores, strict=True):
                hits[row] = top_remaining(row_scores, exclude[row], k[row])
        return hits  # type: ignore[return-value]


def top_remaining(scores: torch.Tensor, exclude: np.ndarray, k: int) -> Hits:
    """Top-``k`` of ``scores`` ``[I]`` (item ``i`` at position ``i - 1``) with the items ``exclude`` removed."""
    seen = torch.from_numpy(np.unique(exclude)) - 1
    scores = scores.clone()
    scores[seen] = float("-inf")
    best = torch.topk(scores, min(k, scores.numel() - seen.numel()))
    return Hits((best.indices + 1).tolist(), best.values.tolist())
