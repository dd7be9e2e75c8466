"""Rows grouped by adapter: the sort order, counts and offsets the grouped kernels share (pure PyTorch)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupSegments:
    """Ids stably sorted by group, with per-group counts and offsets, all left on the ids' device.

    Built once per batch by :func:`segment_groups` and passed as ``segments=`` to every grouped op of the
    batch: computing it needs no host sync, reusing it costs nothing. It may describe *item* ids while an
    op sees *token* rows: with ``B`` ids and ``N = B * T`` rows, row ``i * T + t`` (token ``t`` of item
    ``i``) belongs to ``group_ids[i]``, so one object serves both CLIP towers whatever their token counts.
    """

    order: torch.Tensor
    """``[B]`` int64: positions of the ids, stably sorted by group."""
    counts: torch.Tensor
    """``[C]`` int32: how many ids each group has."""
    offsets: torch.Tensor
    """``[C + 1]`` int32: exclusive prefix sum of ``counts``; group ``c`` is ``order[offsets[c]:offsets[c+1]]``."""
    num_groups: int

    @property
    def num_ids(self) -> int:
        """How many ids were segmented (``B``)."""
        return self.order.numel()

    def rows_per_id(self, num_rows: int) -> int:
        """Rows of an op's input per segmented id (``T``); raises if ``num_rows`` is not a multiple of it."""
        if self.num_ids == 0:
            if num_rows:
                raise ValueError(f"{num_rows} rows but no segmented ids")
            return 1
        if num_rows % self.num_ids:
            raise ValueError(f"{num_rows} rows cannot be split evenly over {self.num_ids} segmented ids")
        return num_rows // self.num_ids


def segment_groups(group_ids: torch.Tensor, num_groups: int) -> GroupSegments:
    """Segment ``group_ids`` (``[B]`` ints in ``[0, num_groups)``, unchecked) by group, without a host sync."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
    sorted_ids, order = torch.sort(group_ids.long(), stable=True)
    bounds = torch.arange(num_groups + 1, device=group_ids.device)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    return GroupSegments(order=order, counts=offsets.diff(), offsets=offsets, num_groups=num_groups)


def shared_group(group_ids: torch.Tensor, groups: int) -> int | None:
    """The group every id belongs to, if one does and finding out needs no device sync (one group, or ids
    on the CPU); else ``None``. Lets an op take its single-group path for a group-homogeneous batch."""
    if groups == 1:
        return 0
    if group_ids.device.type != "cpu" or group_ids.numel() == 0:
        return None
    first = group_ids[0]
    return int(first) if bool((group_ids == first).all()) else None
