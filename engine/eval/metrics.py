"""Full-ranking evaluation: each user's target ranked against every item, reported as HR@K and NDCG@K.

A user ``u`` scores item ``j`` as ``u · z_j`` against the item table of the user's group (PerPEFT has
one table per group; Global PEFT passes a single table and group 0 for everyone). Item 0 is padding and
is never ranked; the items of the user's input history are excluded, except the target itself. The rank
is the number of remaining items scoring strictly higher than the target (0-based), so
``HR@K = 1[rank < K]`` and ``NDCG@K = 1 / log2(rank + 2)`` when ``rank < K``, else 0.

Users are scored in batches: one ``[batch, I]`` score matrix per step, history entries overwritten with
``-inf`` by one ``index_put_``, and the rank counted by one compare and one row sum. Everything stays on
the item tables' device; the host reads a few values per call (group sizes, history offsets, input
checks) and none per batch.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from perpeft.engine.runtime.distributed import current_world

KS = (10, 20, 30)
SELECTION_METRIC = "HR@30"  # the validation metric that selects each stage's best epoch (paper App. C.2)
METRIC_NAMES = tuple(f"{name}@{k}" for name in ("HR", "NDCG") for k in KS)  # the order every report uses
# Users per scoring step: on CPU a [64, I] score matrix stays in cache (2.6× faster than 1024 at 18,884
# items, benchmarks/test_evaluate_bench.py); a GPU wants large matmuls.
CPU_RANKING_BATCH = 64
CUDA_RANKING_BATCH = 4096


def default_ranking_batch(device: torch.device) -> int:
    """Users per scoring step on ``device`` when the caller does not choose."""
    return CUDA_RANKING_BATCH if device.type == "cuda" else CPU_RANKING_BATCH


@dataclass
class HistoryIndex:
    """Users' input histories in CSR form, in the same user order as the user vectors.

    User ``u``'s history is ``indices[indptr[u]:indptr[u + 1]]``: item indices in ``1..I`` (int64, on
    any device; ``target_ranks`` reads ``indptr`` on the host once per call). Duplicates are harmless,
    and a history may contain the user's target (it is still ranked).
    """

    indptr: Tensor
    indices: Tensor

    @classmethod
    def from_sequences(cls, sequences: Sequence[np.ndarray]) -> "HistoryIndex":
        """Index one array of item indices per user; padding entries (item 0) are dropped."""
        arrays = [np.asarray(seq, dtype=np.int64) for seq in sequences]
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate([np.zeros(0, dtype=np.int64), *arrays])
        kept = flat != 0
        owners = np.repeat(np.arange(len(arrays)), lengths)
        indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(np.bincount(owners[kept], minlength=len(arrays)), out=indptr[1:])
        return cls(torch.from_numpy(indptr), torch.from_numpy(flat[kept]))

    @property
    def num_users(self) -> int:
        """Number of users indexed."""
        return len(self.indptr) - 1

    def to(self, device: torch.device | str) -> "HistoryIndex":
        """The same index with both arrays on ``device``."""
        return HistoryIndex(self.indptr.to(device), self.indices.to(device))

    def select(self, users: slice) -> "HistoryIndex":
        """The histories of a contiguous block of users (``slice(start, stop)``)."""
        start, stop, _ = users.indices(self.num_users)
        stop = max(stop, start)
        low, high = int(self.indptr[start]), int(self.indptr[stop])
        return HistoryIndex(self.indptr[start : stop + 1] - low, self.indices[low:high])

    def permuted(self, order: Tensor) -> "HistoryIndex":
        """The same histories for users ``order[0], order[1], ...`` (on this index's device)."""
        order = order.to(self.indptr.device)
        lengths = (self.indptr[1:] - self.indptr[:-1])[order]
        indptr = torch.zeros_like(self.indptr)
        torch.cumsum(lengths, 0, out=indptr[1:])
        shift = torch.repeat_interleave(self.indptr[:-1][order] - indptr[:-1], lengths, output_size=len(self.indices))
        return HistoryIndex(indptr, self.indices[shift + torch.arange(len(shift), device=shift.device)])


@torch.no_grad()
def target_ranks(
    user_vectors: Tensor,
    item_tables: Tensor,
    user_groups: Tensor,
    targets: Tensor,
    history: HistoryIndex,
    batch_size: int | None = None,
) -> Tensor:
    """0-based rank of each user's target among all non-history items of its group's table.

    ``user_vectors`` [U, d]; ``item_tables`` [C, I+1, d] with row 0 padding; ``user_groups`` [U] in
    ``[0, C)``; ``targets`` [U] in ``1..I``; ``history`` over the same U users. Scores are float32; the
    result is int64 [U] on the tables' device. Each step holds a ``[batch_size, I]`` float32 matrix.
    """
    groups = user_groups.to("cpu", torch.int64)
    batch_size = batch_size or default_ranking_batch(item_tables.device)
    _check_inputs(user_vectors, item_tables, groups, targets, history, batch_size)
    num_users, num_items = user_vectors.shape[0], item_tables.shape[1] - 1
    device = item_tables.device
    if num_users == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)

    # Users sorted by group, so that each batch is a contiguous slice scored against one table.
    order = torch.argsort(groups, stable=True)
    group_sizes = torch.bincount(groups, minlength=item_tables.shape[0]).tolist()
    sorted_history = history.permuted(order)
    history_bounds = sorted_history.indptr.tolist()
    history_lengths = (sorted_history.indptr[1:] - sorted_history.indptr[:-1]).to(device)
    history_rows = torch.repeat_interleave(
        torch.arange(num_users, device=device), history_lengths, output_size=history_bounds[-1]
    )
    history_cols = (sorted_history.indices - 1).to(device, torch.int64)
    order_on_device = order.to(device)
    vectors = user_vectors.to(device, torch.float32)[order_on_device]
    target_cols = (targets.to(device, torch.int64) - 1)[order_on_device].unsqueeze(1)
    tables = item_tables.to(torch.float32)

    scores_buffer = torch.empty(min(batch_size, num_users), num_items, dtype=torch.float32, device=device)
    minus_inf = torch.tensor(float("-inf"), device=device)
    sorted_ranks = torch.empty(num_users, dtype=torch.int64, device=device)
    start = 0
    for group, size in enumerate(group_sizes):
        items_t = tables[group, 1:].T
        for lo in range(start, start + size, batch_size):
            hi = min(lo + batch_size, start + size)
            scores = torch.mm(vectors[lo:hi], items_t, out=scores_buffer[: hi - lo])
            target_scores = scores.gather(1, target_cols[lo:hi])
            first, last = history_bounds[lo], history_bounds[hi]
            scores.index_put_((history_rows[first:last] - lo, history_cols[first:last]), minus_inf)
            # The target never beats itself, so a history copy of it (now -inf) is not counted either.
            sorted_ranks[lo:hi] = torch.gt(scores, target_scores, out=scores).sum(1)
        start += size

    ranks = torch.empty_like(sorted_ranks)
    ranks[order_on_device] = sorted_ranks
    return ranks


def _check_inputs(
    user_vectors: Tensor,
    item_tables: Tensor,
    groups: Tensor,
    targets: Tensor,
    history: HistoryIndex,
    batch_size: int,
) -> None:
    if item_tables.dim() != 3 or user_vectors.dim() != 2 or user_vectors.shape[1] != item_tables.shape[2]:
        raise ValueError(
            f"need user_vectors [U, d] and item_tables [C, I+1, d]; got {tuple(user_vectors.shape)} "
            f"and {tuple(item_tables.shape)}"
        )
    num_users, num_items = user_vectors.shape[0], item_tables.shape[1] - 1
    if groups.shape != (num_users,) or targets.shape != (num_users,) or history.num_users != num_users:
        raise ValueError(
            f"user_groups, targets and history must cover the {num_users} users; got "
            f"{tuple(groups.shape)}, {tuple(targets.shape)} and {history.num_users}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_users == 0:
        return
    bounds = torch.stack([targets.min(), targets.max()]).tolist()
    if bounds[0] < 1 or bounds[1] > num_items:
        raise ValueError(f"targets must lie in 1..{num_items}, got {bounds[0]}..{bounds[1]}")
    if groups.min() < 0 or groups.max() >= item_tables.shape[0]:
        raise ValueError(f"user_groups must lie in [0, {item_tables.shape[0]})")
    if len(history.indices) and (history.indices.min() < 1 or history.indices.max() > num_items):
        raise ValueError(f"history items must lie in 1..{num_items}")


def _ranking_sums(ranks: Tensor, ks: Sequence[int]) -> Tensor:
    """float64 ``[1 + 2·len(ks)]``: the user count, then the sums of HR@K and of NDCG@K over users."""
    ranks = ranks.to(torch.float64)
    gains = 1.0 / torch.log2(ranks + 2.0)
    hits = [(ranks < k).to(torch.float64).sum() for k in ks]
    ndcgs = [torch.where(ranks < k, gains, 0.0).sum() for k in ks]
    return torch.stack([torch.tensor(float(ranks.numel()), dtype=torch.float64, device=ranks.device), *hits, *ndcgs])


def _metrics_from_sums(sums: Tensor, ks: Sequence[int]) -> dict[str, float]:
    count, values = float(sums[0]), (sums[1:] / sums[0]).tolist()
    if count == 0:
        raise ValueError("no ranks to average")
    return dict(zip([f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks], values, strict=True))


def ranking_metrics(ranks: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean HR@K and NDCG@K over users from 0-based target ranks, keyed "HR@K" then "NDCG@K"."""
    if ranks.numel() == 0:
        raise ValueError("no ranks to average")
    return _metrics_from_sums(_ranking_sums(ranks, ks), ks)


def full_ranking_metrics(
    user_vectors: Tensor,
    item_tables: Tensor,
    user_groups: Tensor,
    targets: Tensor,
    history: HistoryIndex,
    batch_size: int | None = None,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """``ranking_metrics(target_ranks(...))``: HR@K and NDCG@K of a full-ranking evaluation.

    Under a process group every rank passes its block of the users (maybe none); the user count and the
    metric sums are added over the ranks, so every rank returns the metrics of all users together.
    """
    ranks = target_ranks(user_vectors, item_tables, user_groups, targets, history, batch_size)
    return _metrics_from_sums(current_world().sum(_ranking_sums(ranks, ks)), ks)
