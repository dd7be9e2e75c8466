"""Chronological leave-one-out split and fixed-length windows over sequences."""

from dataclasses import dataclass
from typing import Literal

import numpy as np

Stage = Literal["valid", "test"]


@dataclass
class Split:
    """Per-user training sequences and held-out targets, indexed by engine user id (index 0 is padding).

    ``train[u]`` is user u's int64 training sequence; ``valid_target[u]`` and ``test_target[u]`` are the
    held-out items, 0 for users that are not evaluated.
    """

    train: list[np.ndarray]
    valid_target: np.ndarray
    test_target: np.ndarray

    @property
    def eval_users(self) -> np.ndarray:
        """Engine ids (int64, ascending) of the users with held-out targets."""
        return np.flatnonzero(self.test_target).astype(np.int64)

    def history(self, stage: Stage) -> list[np.ndarray]:
        """Each user's input history for ``stage``: train for "valid", train + validation item for "test"."""
        if stage == "valid":
            return list(self.train)
        if stage == "test":
            return [
                np.append(sequence, target) if target else sequence
                for sequence, target in zip(self.train, self.valid_target.tolist(), strict=True)
            ]
        raise ValueError(f"unknown stage {stage!r}; expected 'valid' or 'test'")


def leave_one_out(sequences: list[np.ndarray]) -> Split:
    """Last item → test, second last → validation, the rest → train; users with < 3 items are train-only.

    ``sequences[0]`` is the padding user and always ends up empty with no targets.
    """
    empty = np.empty(0, dtype=np.int64)
    train = [empty]
    valid_target = np.zeros(len(sequences), dtype=np.int64)
    test_target = np.zeros(len(sequences), dtype=np.int64)
    for user, sequence in enumerate(sequences[1:], start=1):
        sequence = np.asarray(sequence, dtype=np.int64)
        if len(sequence) < 3:
            train.append(sequence)
            continue
        train.append(sequence[:-2])
        valid_target[user] = sequence[-2]
        test_target[user] = sequence[-1]
    return Split(train=train, valid_target=valid_target, test_target=test_target)


def last_window(sequences: list[np.ndarray], maxlen: int) -> np.ndarray:
    """The most recent ``maxlen`` items of each sequence, left-padded with 0: int64 ``[N, maxlen]``."""
    if maxlen < 1:
        raise ValueError(f"maxlen must be at least 1, got {maxlen}")
    window = np.zeros((len(sequences), maxlen), dtype=np.int64)
    if not sequences:
        return window
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    kept = np.minimum(lengths, maxlen)
    total = int(kept.sum())
    if total == 0:
        return window
    items = np.concatenate(sequences).astype(np.int64, copy=False)
    # For every kept item: its row, its offset within the kept tail, its source index and its column.
    rows = np.repeat(np.arange(len(sequences)), kept)
    within_tail = np.arange(total) - np.repeat(np.cumsum(kept) - kept, kept)
    source = np.repeat(np.cumsum(lengths) - kept, kept) + within_tail
    columns = maxlen - np.repeat(kept, kept) + within_tail
    window[rows, columns] = items[source]
    return window
