"""The in-memory dataset every loader produces and every stage consumes."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Dataset:
    """A catalog and chronological user sequences, in engine indices.

    Engine index 0 is padding for items and users alike: ``item_ids[0]``, ``user_ids[0]`` and
    ``image_paths[0]`` are None, ``titles[0]`` is "" and ``sequences[0]`` is empty. Items are numbered
    1..I in the order of the item file, users 1..U in the order of their first interaction.
    """

    name: str
    root: Path
    item_ids: list[str | None]
    titles: list[str]
    image_paths: list[Path | None]
    user_ids: list[str | None]
    sequences: list[np.ndarray]

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def num_users(self) -> int:
        return len(self.user_ids) - 1

    @property
    def has_text(self) -> bool:
        """Whether any item has a text (a catalog without text trains on images only)."""
        return any(title.strip() for title in self.titles[1:])

    @property
    def has_images(self) -> bool:
        """Whether any item has an image (a catalog without images trains on text only)."""
        return any(path is not None for path in self.image_paths[1:])
