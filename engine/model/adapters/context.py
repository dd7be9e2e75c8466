"""The per-item group ids that every grouped adapter in both CLIP towers reads during one forward."""

import torch

from perpeft.kernels.segments import GroupSegments, segment_groups, shared_group


class GroupContext:
    """Holds the item batch's group ids while the encoder runs CLIP.

    The encoder sets the ids once per forward; each adapted layer asks for per-token-row ids (for the
    PyTorch path) and for the ids' :class:`GroupSegments` (for the Triton path). Both are built on first
    request and reused by every later layer of the forward: row ids once per sequence length (one for
    the text tower, one for the vision tower), segments once per number of groups (item-level, so one
    object serves both towers).
    """

    def __init__(self) -> None:
        self._item_groups: torch.Tensor | None = None
        self._row_groups: dict[int, torch.Tensor] = {}
        self._segments: dict[int, GroupSegments] = {}
        self._shared: dict[int, int | None] = {}

    def set(self, item_groups: torch.Tensor) -> None:
        self._item_groups = item_groups
        self._row_groups = {}
        self._segments = {}
        self._shared = {}

    def clear(self) -> None:
        self._item_groups = None
        self._row_groups = {}
        self._segments = {}
        self._shared = {}

    def _items(self) -> torch.Tensor:
        if self._item_groups is None:
            raise RuntimeError("grouped adapter called outside GroupedClipEncoder.forward: no group ids set")
        return self._item_groups

    def row_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Group id of every row of ``x.reshape(-1, x.shape[-1])``, for ``x`` of shape ``[B, T, K]`` or ``[B, K]``."""
        tokens = x.shape[1] if x.dim() == 3 else 1
        rows = self._row_groups.get(tokens)
        if rows is None:
            rows = self._items().repeat_interleave(tokens)
            self._row_groups[tokens] = rows
        return rows

    def segments(self, num_groups: int) -> GroupSegments:
        """The item ids segmented over ``num_groups`` groups; valid for token rows of either tower."""
        segments = self._segments.get(num_groups)
        if segments is None:
            segments = segment_groups(self._items(), num_groups)
            self._segments[num_groups] = segments
        return segments

    def shared_group(self, num_groups: int) -> int | None:
        """The one group of every item, when there is one and finding out needs no device sync (see
        ``kernels.shared_group``); asked once per forward."""
        if num_groups not in self._shared:
            self._shared[num_groups] = shared_group(self._items(), num_groups)
        return self._shared[num_groups]
