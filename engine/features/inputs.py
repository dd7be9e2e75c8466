"""Item inputs for CLIP, prepared once: token ids and preprocessed uint8 pixels."""

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from perpeft.engine.clip.preprocess import Tokenizer, preprocess_image
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.atomic import temporary_directory_beside
from perpeft.engine.runtime.cache import cache_root, discard_damaged, publish_directory
from perpeft.engine.runtime.device import to_device


@dataclass
class ItemInputs:
    """Token ids, attention masks and uint8 pixels of every item (row 0 is padding), memory-mapped.

    ``present`` is bool ``[I+1, 2]``: whether each item has an image (column 0) and a title (column 1).
    A missing image is stored as black pixels and a missing title as an empty text; the model swaps in
    a learned placeholder for the missing modality's embedding (see ``GroupedProjector``).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixels: np.ndarray
    present: np.ndarray
    directory: Path
    text_widths: np.ndarray = field(init=False, repr=False)
    right_padded: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Columns up to each title's last attended token. Titles are padded to the tokenizer's maximum (77
        # for CLIP) but a batch needs only its longest title's columns: with CLIP's causal attention and
        # EOS pooling, the columns after a row's last real token change none of its outputs. For the
        # same reason a right-padded catalog needs no padding mask at all (causal attention never looks
        # ahead), which spares the text tower building and checking one in every forward.
        mask = np.asarray(self.attention_mask) != 0
        last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
        self.text_widths = np.where(mask.any(axis=1), last, 1)
        columns = np.arange(mask.shape[1])
        self.right_padded = bool(np.array_equal(mask, columns[None, :] < last[:, None]))

    @property
    def has_missing(self) -> bool:
        """Whether any real item lacks its image or its title."""
        return not bool(self.present[1:].all())

    def by_text_width(self) -> np.ndarray:
        """Every item index (padding row included) ordered by title width: consecutive chunks of this
        order hold titles of similar length, so `batch` cuts their token columns the most."""
        return np.argsort(self.text_widths, kind="stable")

    def modalities(self, items: torch.Tensor, device: torch.device) -> torch.Tensor:
        """bool ``[N, 2]``: image and title presence of ``items``."""
        return to_device(torch.from_numpy(self.present[items.cpu().numpy()]), device)

    def batch(
        self, items: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Token ids, attention mask (None for a right-padded catalog: see above) and uint8 pixels of
        ``items`` on ``device``, token columns cut to the batch's longest title; pixels stay uint8 until
        they are on the device."""
        index = items.cpu().numpy()
        width = int(self.text_widths[index].max()) if index.size else 1
        input_ids = torch.from_numpy(np.ascontiguousarray(self.input_ids[index, :width]))
        mask = None if self.right_padded else torch.from_numpy(np.ascontiguousarray(self.attention_mask[index, :width]))
        pixels = torch.from_numpy(np.ascontiguousarray(self.pixels[index]))
        return (
            to_device(input_ids, device),
            None if mask is None else to_device(mask, device),
            to_device(pixels, device),
        )


def modality_presence(dataset: Dataset) -> np.ndarray:
    """bool ``[I+1, 2]``: (has image, has title) per item; the padding row counts as complete."""
    present = np.ones((dataset.num_items + 1, 2), dtype=bool)
    present[1:, 0] = [path is not None for path in dataset.image_paths[1:]]
    present[1:, 1] = [bool(title.strip()) for title in dataset.titles[1:]]
    return present


def input_cache_key(dataset: Dataset, tokenizer_id: str, image_size: int) -> str:
    """Content key of the item inputs: titles, image files (name, size, mtime), tokenizer, image size."""
    digest = hashlib.sha256()
    digest.update(f"{tokenizer_id}\n{image_size}\n".encode())
    for title, image in zip(dataset.titles, dataset.image_paths, strict=True):
        digest.update(title.encode())
        if image is not None:
            stat = image.stat()
            digest.update(f"\0{image.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        digest.update(b"\n")
    return digest.hexdigest()[:20]


def load_item_inputs(
    dataset: Dataset, tokenizer: Tokenizer, tokenizer_id: str, image_size: int, progress: bool = True
) -> ItemInputs:
    """Build the cache once per (catalog, tokenizer, image size) and memory-map it on every later call."""
    key = input_cache_key(dataset, tokenizer_id, image_size)
    directory = cache_root() / "inputs" / f"{dataset.name}-{key}"
    if (directory / "meta.json").is_file():
        try:
            return _open_item_inputs(dataset, image_size, directory)
        except (OSError, ValueError) as error:
            discard_damaged(directory, str(error))
    _build_item_inputs(dataset, tokenizer, image_size, directory, progress)
    return _open_item_inputs(dataset, image_size, directory)


def _open_item_inputs(dataset: Dataset, image_size: int, directory: Path) -> ItemInputs:
    """The cache in ``directory``, memory-mapped; ValueError when a file is cut short or of another shape."""
    meta = json.loads((directory / "meta.json").read_bytes())
    expected = {"dataset": dataset.name, "items": dataset.num_items, "image_size": image_size}
    if meta != expected:
        raise ValueError(f"meta.json says {meta}, expected {expected}")
    input_ids = np.load(directory / "input_ids.npy", mmap_mode="r")
    attention_mask = np.load(directory / "attention_mask.npy", mmap_mode="r")
    pixels = np.load(directory / "pixels.npy", mmap_mode="r")
    rows = dataset.num_items + 1
    if input_ids.shape[0] != rows or attention_mask.shape != input_ids.shape:
        raise ValueError(f"token arrays of shapes {input_ids.shape} and {attention_mask.shape} for {rows} rows")
    if pixels.shape != (rows, 3, image_size, image_size):
        raise ValueError(f"pixels of shape {pixels.shape}, expected {(rows, 3, image_size, image_size)}")
    return ItemInputs(input_ids, attention_mask, pixels, modality_presence(dataset), directory)


def _build_item_inputs(
    dataset: Dataset, tokenizer: Tokenizer, image_size: int, directory: Path, progress: bool
) -> None:
    staging = temporary_directory_beside(directory)
    try:
        input_ids, attention_mask = tokenizer(dataset.titles)
        np.save(staging / "input_ids.npy", input_ids)
        np.save(staging / "attention_mask.npy", attention_mask)
        pixels = np.lib.format.open_memmap(
            staging / "pixels.npy", mode="w+", dtype=np.uint8, shape=(dataset.num_items + 1, 3, image_size, image_size)
        )
        pixels[0] = 0
        images = tqdm(
            enumerate(dataset.image_paths[1:], start=1),
            total=dataset.num_items,
            desc=f"Caching {dataset.name} images",
            unit="img",
            disable=not progress,
            leave=False,
        )
        for index, path in images:
            pixels[index] = _decode(path, image_size)
        pixels.flush()
        del pixels
        (staging / "meta.json").write_text(
            json.dumps({"dataset": dataset.name, "items": dataset.num_items, "image_size": image_size})
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, directory)


def _decode(path: Path | None, image_size: int) -> np.ndarray:
    if path is None:
        return np.zeros((3, image_size, image_size), dtype=np.uint8)
    try:
        with Image.open(path) as image:
            return preprocess_image(image, image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: unreadable image ({type(error).__name__}: {error})") from None
