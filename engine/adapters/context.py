"""The per-item group ids that every grouped adapter in both CLIP towers reads during one forward."""

import torch


class GroupContext:
    """Holds the item batch's group ids while the encoder runs CLIP.

    The encoder sets the ids once per forward; each adapted layer asks for per-token-row ids, which are
    expanded once per sequence length (one value for the text tower, one for the vision tower) and
    reused by every layer of that tower.
    """

    def __init__(self) -> None:
        self._item_groups: torch.Tensor | None = None
        self._row_groups: dict[int, torch.Tensor] = {}

    def set(self, item_groups: torch.Tensor) -> None:
        self._item_groups = item_groups
        self._row_groups = {}

    def clear(self) -> None:
        self._item_groups = None
        self._row_groups = {}

    def row_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Group id of every row of ``x.reshape(-1, x.shape[-1])``, for ``x`` of shape ``[B, T, K]`` or ``[B, K]``."""
        if self._item_groups is None:
            raise RuntimeError("grouped adapter called outside GroupedClipEncoder.forward: no group ids set")
        tokens = x.shape[1] if x.dim() == 3 else 1
        rows = self._row_groups.get(tokens)
        if rows is None:
            rows = self._item_groups.repeat_interleave(tokens)
            self._row_groups[tokens] = rows
        return rows
