"""The item batch's groups that every grouped adapter in both CLIP towers reads during one forward."""

import torch

from perpeft.engine.model.groups import RowGroups
from perpeft.kernels.segments import GroupSegments


class GroupContext:
    """Holds the item batch's :class:`RowGroups` while the encoder runs CLIP.

    The encoder sets them once per forward; each adapted layer asks for per-token-row ids (for the
    PyTorch path), for the items' :class:`GroupSegments` (for the Triton path; item-level, so one object
    serves both towers) and for the one group a homogeneous batch shares. Row ids are built on first
    request, once per sequence length (one for the text tower, one for the vision tower).
    """

    def __init__(self) -> None:
        self._groups: RowGroups | None = None
        self._row_groups: dict[int, torch.Tensor] = {}

    def set(self, groups: RowGroups) -> None:
        self._groups = groups
        self._row_groups = {}

    def clear(self) -> None:
        self._groups = None
        self._row_groups = {}

    def _items(self, num_groups: int) -> RowGroups:
        if self._groups is None:
            raise RuntimeError("grouped adapter called outside GroupedClipEncoder.forward: no groups set")
        if self._groups.num_groups != num_groups:
            raise ValueError(f"an adapter of {num_groups} groups got a batch of {self._groups.num_groups} groups")
        return self._groups

    def row_groups(self, x: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Group id of every row of ``x.reshape(-1, x.shape[-1])``, for ``x`` of shape ``[B, T, K]`` or ``[B, K]``."""
        tokens = x.shape[1] if x.dim() == 3 else 1
        rows = self._row_groups.get(tokens)
        if rows is None:
            rows = self._items(num_groups).ids.repeat_interleave(tokens)
            self._row_groups[tokens] = rows
        return rows

    def segments(self, num_groups: int) -> GroupSegments:
        """The items segmented by group; valid for token rows of either tower."""
        return self._items(num_groups).segments

    def shared_group(self, num_groups: int) -> int | None:
        """The one group of every item of a homogeneous batch (known on the host), else ``None``."""
        return self._items(num_groups).single
