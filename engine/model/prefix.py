"""Every item's frozen start of the CLIP towers, computed once per catalog and looked up per batch.

Under LoRA and (IA)3 the start of each tower's first layer never changes: the embeddings (and the vision
tower's pre-norm), ``layer_norm1`` of them and the base q, k and v projections (`pooled.title_prefix`,
`pooled.image_prefix`). A training step or an evaluation table would run them again for every item of the
batch, for every group; `CatalogPrefix` holds them for the whole catalog, and `ItemPrefix` hands a batch
its rows. On a small CLIP on the CPU these are about a twentieth of a training step.
"""

from dataclasses import dataclass

import torch

from perpeft.engine.clip.pooled import TitleRows

PREFIX_BYTES_AT_MOST = 256 * 2**20  # a catalog whose prefix would take more runs the towers from their inputs


@dataclass(frozen=True)
class CatalogPrefix:
    """The first-layer prefix of every item (row 0 is padding), on one device: ``title`` ``[I+1, W, 5·D]``
    (``W``: the catalog's longest title) and ``image`` ``[I+1, P, 5·D]``, None for a tower the encoder
    does not run."""

    title: torch.Tensor | None
    image: torch.Tensor | None

    def __post_init__(self) -> None:
        for name, part in (("title", self.title), ("image", self.image)):
            if part is not None and part.dim() != 3:
                raise ValueError(f"a {name} prefix of shape {tuple(part.shape)}, expected [items, positions, 5·D]")
        if self.title is not None and self.image is not None and self.title.shape[0] != self.image.shape[0]:
            raise ValueError(f"title prefix of {self.title.shape[0]} items, image prefix of {self.image.shape[0]}")

    def take(self, items: torch.Tensor) -> "ItemPrefix":
        """The rows of ``items`` (int64 ``[N]`` on the prefix's device)."""
        return ItemPrefix(self, items)


@dataclass(frozen=True)
class ItemPrefix:
    """A batch's rows of a `CatalogPrefix`: ``items`` are the batch's item ids, in batch order."""

    catalog: CatalogPrefix
    items: torch.Tensor

    def image(self) -> torch.Tensor:
        """``[N, P, 5·D]``: the items' image rows."""
        if self.catalog.image is None:
            raise ValueError("this prefix has no image tower")
        return self.catalog.image.index_select(0, self.items)

    def title(self, packing: TitleRows | None, width: int) -> torch.Tensor:
        """The items' title rows: the kept rows of ``packing`` ``[T, 5·D]``, or without packing the first
        ``width`` positions of each ``[N, width, 5·D]``."""
        title = self.catalog.title
        if title is None:
            raise ValueError("this prefix has no text tower")
        if width > title.shape[1]:
            raise ValueError(f"titles of {width} positions, but the prefix holds {title.shape[1]}")
        if packing is None:
            return title.index_select(0, self.items)[:, :width]
        rows = self.items[packing.items] * title.shape[1] + packing.columns
        return title.flatten(0, 1).index_select(0, rows)
