"""Training batches of (seq, pos, neg) windows of users' sequences, with global or group-specific negatives."""

from dataclasses import dataclass

import numpy as np

from perpeft.engine.config.choices import TRAIN_WINDOWS
from perpeft.engine.data.split import last_window

# Rejection rounds before the few negatives still colliding with the user's items are drawn exactly.
REJECTION_ROUNDS = 16


@dataclass
class Batch:
    """One training batch; ``seq``/``pos``/``neg`` are int64 ``[B, maxlen]`` with 0 at padding positions."""

    users: np.ndarray  # the user of each row (a user may fill several rows with ``windows="all"``)
    seq: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    group: int  # -1 when batches mix groups


class TrainSampler:
    """SASRec-style sequence batches: input ``t[:-1]``, positives ``t[1:]``, one negative per position.

    A training sequence ``t`` of an eligible user (train length ≥ 2) gives ``windows="last"`` one row, its
    most recent ``maxlen`` positions (the paper's protocol); ``windows="all"`` one row per ``maxlen``
    positions counted back from the end, non-overlapping, so that an epoch has a loss on every training
    target of every user once; ``windows="prefix"`` one row per training target (RecBole's one sample per
    prefix), the ``maxlen`` items before it as input and a loss on that target only. Without
    ``user_groups`` each epoch is a permutation of all rows chunked into batches. With ``user_groups``
    (int64 ``[U+1]``, entry 0 ignored) every batch holds one group's rows, and the batches of all groups
    are shuffled together. Negatives are uniform over all items, or over I_c (items in the training
    sequences of group c's users) when ``group_negatives``; a negative is never an item of the user's
    training sequence. If the pool holds nothing but the user's own items, that user's negatives come from
    all items instead.
    """

    def __init__(
        self,
        train: list[np.ndarray],
        num_items: int,
        maxlen: int,
        batch_size: int,
        user_groups: np.ndarray | None = None,
        group_negatives: bool = False,
        windows: str = "last",
    ) -> None:
        if windows not in TRAIN_WINDOWS.values:
            raise ValueError(f"windows must be one of {TRAIN_WINDOWS.values}, got {windows!r}")
        if maxlen < 1 or batch_size < 1 or num_items < 1:
            raise ValueError(
                f"maxlen, batch_size and num_items must be positive, got {maxlen}, {batch_size}, {num_items}"
            )
        if group_negatives and user_groups is None:
            raise ValueError("group_negatives needs user_groups")
        if user_groups is not None and len(user_groups) != len(train):
            raise ValueError(f"user_groups has {len(user_groups)} entries, expected {len(train)} (U+1)")
        self.num_items = num_items
        self.batch_size = batch_size

        lengths = np.fromiter(map(len, train), dtype=np.int64, count=len(train))
        lengths[0] = 0
        self.eligible_users = np.flatnonzero(lengths >= 2).astype(np.int64)
        user_sequences = [np.asarray(train[user], dtype=np.int64) for user in self.eligible_users]
        targets = lengths[self.eligible_users] - 1
        # Rows of a user step back from the end of its sequence: by maxlen ("all") or by one ("prefix").
        stride = 1 if windows == "prefix" else maxlen
        per_user = -(-targets // stride) if windows != "last" else np.ones_like(targets)
        # Row r is window k (0: the most recent) of eligible user _row_user[r]: input positions [start, stop).
        self._row_user = np.repeat(np.arange(len(self.eligible_users)), per_user)
        back = np.arange(len(self._row_user)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
        stops = targets[self._row_user] - back * stride
        starts = np.maximum(stops - maxlen, 0)
        windows_at = zip(self._row_user.tolist(), starts.tolist(), stops.tolist(), strict=True)
        spans = [(user_sequences[user], start, stop) for user, start, stop in windows_at]
        self._seq = last_window([sequence[start:stop] for sequence, start, stop in spans], maxlen)
        self._pos = last_window([sequence[start + 1 : stop + 1] for sequence, start, stop in spans], maxlen)
        if windows == "prefix":
            self._pos[:, :-1] = 0  # one target per row, at its last position, after its full context

        train_items = np.concatenate([np.empty(0, dtype=np.int64), *train[1:]]).astype(np.int64, copy=False)
        if len(train_items) and (train_items.min() < 1 or train_items.max() > num_items):
            raise ValueError(f"training items must lie in 1..{num_items}")

        # Each (row, item) of an eligible user's training items, as one sorted key row·(I+1) + item.
        items = np.concatenate([np.empty(0, dtype=np.int64), *user_sequences])
        rows = np.repeat(np.arange(len(self.eligible_users)), lengths[self.eligible_users])
        self._user_item_keys = np.unique(rows * (num_items + 1) + items)
        distinct_items = np.bincount(self._user_item_keys // (num_items + 1), minlength=len(self.eligible_users))

        self._groups = (
            None
            if user_groups is None
            else np.asarray(user_groups, dtype=np.int64)[self.eligible_users][self._row_user]
        )
        all_items = np.arange(1, num_items + 1, dtype=np.int64)
        if group_negatives:
            if user_groups is None:  # refused above; checked again for the type checker
                raise ValueError("group_negatives needs user_groups")
            group_pools, pool_offset, pool_size = self._group_pools(train_items, lengths, user_groups)
        else:
            group_pools = all_items
            pool_offset = np.zeros(len(self.eligible_users), dtype=np.int64)
            pool_size = np.full(len(self.eligible_users), num_items, dtype=np.int64)
        # Users whose items fill their whole pool fall back to all items (appended after the pools).
        exhausted = distinct_items >= pool_size
        complete = distinct_items >= num_items
        if complete.any():
            user = self.eligible_users[np.argmax(complete)]
            raise ValueError(f"user {user} has every item in their training sequence; no negative exists")
        self._pools = np.concatenate([group_pools, all_items])
        self._pool_offset = np.where(exhausted, len(group_pools), pool_offset)
        self._pool_size = np.where(exhausted, num_items, pool_size)

    def _group_pools(
        self, train_items: np.ndarray, lengths: np.ndarray, user_groups: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """I_c for every group, concatenated, and each eligible user's (offset, size) into it.

        ``train_items`` are the training sequences of users 1..U concatenated, ``lengths`` their lengths.
        """
        user_groups = np.asarray(user_groups, dtype=np.int64)
        group_ids, group_index = np.unique(user_groups[1:], return_inverse=True)
        group_index = np.concatenate([[0], group_index])  # user 0 has no items, so its group is moot
        keys = np.unique(np.repeat(group_index[1:], lengths[1:]) * (self.num_items + 1) + train_items)
        group_of_key = keys // (self.num_items + 1)
        starts = np.searchsorted(group_of_key, np.arange(len(group_ids)))
        sizes = np.bincount(group_of_key, minlength=len(group_ids))
        eligible_group = group_index[self.eligible_users]
        return keys % (self.num_items + 1), starts[eligible_group], sizes[eligible_group]

    @property
    def num_rows(self) -> int:
        """Training windows per epoch."""
        return len(self._row_user)

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        if self._groups is None:
            return -(-self.num_rows // self.batch_size)
        _, group_sizes = np.unique(self._groups, return_counts=True)
        return int(np.sum(-(-group_sizes // self.batch_size)))

    def epoch(self, rng: np.random.Generator) -> list[Batch]:
        """One epoch of batches; every row (window) appears exactly once, all randomness from ``rng``."""
        chunks = self._batch_rows(rng)
        rows = np.concatenate([np.empty(0, dtype=np.int64), *chunks])
        seq, pos = self._seq[rows], self._pos[rows]
        neg = np.zeros_like(pos)
        real = pos > 0
        neg[real] = self._negatives(np.broadcast_to(self._row_user[rows][:, None], pos.shape)[real], rng)

        batches = []
        start = 0
        for chunk in chunks:
            stop = start + len(chunk)
            group = -1 if self._groups is None else int(self._groups[chunk[0]])
            users = self.eligible_users[self._row_user[chunk]]
            batches.append(Batch(users, seq[start:stop], pos[start:stop], neg[start:stop], group))
            start = stop
        return batches

    def _batch_rows(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Rows of each batch, in epoch order."""
        if self._groups is None:
            order = rng.permutation(self.num_rows)
            return [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        chunks: list[np.ndarray] = []
        for group in np.unique(self._groups):
            members = rng.permutation(np.flatnonzero(self._groups == group))
            chunks.extend(members[start : start + self.batch_size] for start in range(0, len(members), self.batch_size))
        return [chunks[index] for index in rng.permutation(len(chunks))]

    def _negatives(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One negative per entry of ``rows`` (indices into the eligible users): uniform over the user's pool
        minus the user's own items."""
        negatives = self._draw(rows, rng)
        pending = np.flatnonzero(self._owned(rows, negatives))
        for _ in range(REJECTION_ROUNDS):
            if len(pending) == 0:
                return negatives
            negatives[pending] = self._draw(rows[pending], rng)
            pending = pending[self._owned(rows[pending], negatives[pending])]
        # Pools crowded with the user's own items: draw exactly from what is left.
        for row in np.unique(rows[pending]):
            targets = pending[rows[pending] == row]
            offset = self._pool_offset[row]
            allowed = np.setdiff1d(self._pools[offset : offset + self._pool_size[row]], self._items_of(row))
            negatives[targets] = allowed[rng.integers(0, len(allowed), size=len(targets))]
        return negatives

    def _draw(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._pools[self._pool_offset[rows] + rng.integers(0, self._pool_size[rows])]

    def _owned(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each item is in its row's training sequence."""
        keys = rows * (self.num_items + 1) + items
        found = np.searchsorted(self._user_item_keys, keys)
        return self._user_item_keys[np.minimum(found, len(self._user_item_keys) - 1)] == keys

    def _items_of(self, row: int) -> np.ndarray:
        low, high = np.searchsorted(
            self._user_item_keys, [row * (self.num_items + 1), (row + 1) * (self.num_items + 1)]
        )
        return self._user_item_keys[low:high] - row * (self.num_items + 1)
