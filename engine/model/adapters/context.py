"""The item batch's groups that every grouped adapter in both CLIP towers reads during one forward."""

import contextlib
from collections.abc import Iterator

import torch

from perpeft.engine.model.groups import RowGroups
from perpeft.kernels.segments import GroupSegments


class GroupContext:
    """Holds the item batch's :class:`RowGroups` while the encoder runs CLIP.

    The encoder sets them once per forward; each adapted layer asks for per-token-row ids (for the
    PyTorch path), for the items' :class:`GroupSegments` (for the Triton path; item-level, so one object
    serves both towers) and for the one group a homogeneous batch shares. Row ids are built on first
    request, once per sequence length (one for the text tower, one for the vision tower).

    Inside :meth:`packed`, a 2-D input whose row count is the packed total holds packed token rows
    (``lengths[i]`` consecutive rows of item ``i``, items in batch order): its row ids repeat each item's
    group by its length, and it has no item-level segments.
    """

    def __init__(self) -> None:
        self._groups: RowGroups | None = None
        self._row_groups: dict[int, torch.Tensor] = {}
        self._packed: tuple[int, torch.Tensor] | None = None

    def set(self, groups: RowGroups) -> None:
        self._groups = groups
        self._row_groups = {}
        self._packed = None

    def clear(self) -> None:
        self._groups = None
        self._row_groups = {}
        self._packed = None

    @contextlib.contextmanager
    def packed(self, lengths: torch.Tensor | None) -> Iterator[None]:
        """While inside, 2-D inputs of ``lengths.sum()`` rows are packed token rows (nothing changes for None)."""
        if lengths is None:
            yield
            return
        groups = self._batch()
        if lengths.shape != (groups.rows,):
            raise ValueError(f"{groups.rows} items but packed lengths of shape {tuple(lengths.shape)}")
        ids = groups.ids.repeat_interleave(lengths.to(groups.ids.device))
        self._packed = (ids.numel(), ids)
        try:
            yield
        finally:
            self._packed = None

    def _packed_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._packed is not None and x.dim() == 2 and x.shape[0] == self._packed[0]:
            return self._packed[1]
        return None

    def _batch(self) -> RowGroups:
        if self._groups is None:
            raise RuntimeError("grouped adapter called outside GroupedClipEncoder.forward: no groups set")
        return self._groups

    def _items(self, num_groups: int) -> RowGroups:
        groups = self._batch()
        if groups.num_groups != num_groups:
            raise ValueError(f"an adapter of {num_groups} groups got a batch of {groups.num_groups} groups")
        return groups

    def row_groups(self, x: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Group id of every row of ``x.reshape(-1, x.shape[-1])``, for ``x`` of shape ``[B, T, K]`` or ``[B, K]``
        (or packed token rows)."""
        packed = self._packed_ids(x)
        if packed is not None:
            self._items(num_groups)
            return packed
        tokens = x.shape[1] if x.dim() == 3 else 1
        rows = self._row_groups.get(tokens)
        if rows is None:
            rows = self._items(num_groups).ids.repeat_interleave(tokens)
            self._row_groups[tokens] = rows
        return rows

    def segments(self, num_groups: int, x: torch.Tensor) -> GroupSegments | None:
        """The items segmented by group, valid for ``x``'s token rows in either tower; None for packed rows
        (the op segments their row ids itself)."""
        items = self._items(num_groups)
        return None if self._packed_ids(x) is not None else items.segments

    def item_groups(self, num_groups: int) -> torch.Tensor:
        """Group id of every item of the batch ``[B]``, on the rows' device."""
        return self._items(num_groups).ids

    def shared_group(self, num_groups: int) -> int | None:
        """The one group of every item of a homogeneous batch (known on the host), else ``None``."""
        return self._items(num_groups).single
