"""Which group's adapter each row of a batch uses, decided on the host so no layer asks the device."""

from dataclasses import dataclass, field

import torch

from perpeft.engine.runtime.device import to_device
from perpeft.kernels.segments import GroupSegments, segment_groups


@dataclass(frozen=True)
class RowGroups:
    """The group of every row of a batch: ``host`` (int64 ``[N]`` on the CPU) and ``ids`` (the same on the
    rows' device), with ``single``, the group every row shares (``None`` when the rows mix groups).

    Built once per batch from the sampler's group (an int) or per-row host ids, so a group-homogeneous
    batch takes every layer's single-group path on any device: nothing reads the ids back from the device.
    """

    host: torch.Tensor
    ids: torch.Tensor
    single: int | None
    num_groups: int
    _segments: GroupSegments | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.host.device.type != "cpu" or self.host.dim() != 1:
            raise ValueError(
                f"host group ids must be a 1-D CPU tensor, got {tuple(self.host.shape)} on {self.host.device}"
            )
        if self.single is not None and not 0 <= self.single < self.num_groups:
            raise ValueError(f"group {self.single} is outside [0, {self.num_groups})")

    @classmethod
    def one(cls, group: int, rows: int, num_groups: int, device: torch.device) -> "RowGroups":
        """``rows`` rows of group ``group``."""
        host = torch.full((rows,), group, dtype=torch.long)
        return cls(host, torch.full((rows,), group, dtype=torch.long, device=device), group, num_groups)

    @classmethod
    def per_row(cls, ids: torch.Tensor, num_groups: int, device: torch.device) -> "RowGroups":
        """Rows with their own groups, ``ids`` on the host (int ``[N]`` in ``[0, num_groups)``)."""
        host = ids.long()
        if host.device.type != "cpu":
            raise ValueError(
                f"per-row group ids must be on the host (reading them from {host.device} would wait for it)"
            )
        if host.numel() and not (int(host.min()) >= 0 and int(host.max()) < num_groups):
            raise ValueError(f"group ids must lie in [0, {num_groups})")
        single = None
        if num_groups == 1:
            single = 0
        elif host.numel() and bool((host == host[0]).all()):
            single = int(host[0])
        return cls(host, to_device(host, device), single, num_groups)

    @classmethod
    def of(cls, group: int | torch.Tensor, rows: int, num_groups: int, device: torch.device) -> "RowGroups":
        """One group for all ``rows`` rows (an int), or per-row host ids (a tensor)."""
        if isinstance(group, torch.Tensor):
            if group.shape != (rows,):
                raise ValueError(f"{rows} rows but group ids of shape {tuple(group.shape)}")
            return cls.per_row(group, num_groups, device)
        return cls.one(group, rows, num_groups, device)

    @property
    def rows(self) -> int:
        return self.host.numel()

    def take(self, rows: torch.Tensor) -> "RowGroups":
        """The groups of ``rows`` (host indices) of this batch."""
        if self.single is not None:
            return RowGroups.one(self.single, rows.numel(), self.num_groups, self.ids.device)
        return RowGroups.per_row(self.host[rows], self.num_groups, self.ids.device)

    @property
    def segments(self) -> GroupSegments:
        """The rows segmented by group on their device (for the Triton kernels; built once per batch, on
        first request). Cached by hand: ``functools.cached_property`` takes a lock torch.compile cannot trace."""
        segments = self._segments
        if segments is None:
            segments = segment_groups(self.ids, self.num_groups)
            object.__setattr__(self, "_segments", segments)
        return segments
