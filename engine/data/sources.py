"""Where datasets come from: the built-in demo, named prepared datasets or a directory; and how ``prepare`` writes one.

A prepared dataset is a RecBole-style directory (`load_recbole`) plus ``stats.json`` (the paper's Table 1
columns and a count of every record dropped, by reason) and, when some items have no image,
``missing_images.txt`` (one item id a line).
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from perpeft.engine.config.methods import method_of
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.data.formats import (
    ITEM_COLUMN,
    MISSING_IMAGES,
    TIME_COLUMN,
    TITLE_COLUMN,
    USER_COLUMN,
    check_image,
    load_recbole,
)
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.atomic import replace_directory, temporary_directory_beside
from perpeft.engine.runtime.cache import cache_root

DEMO = "demo"
DEMO_WORLD_SEED = 0
_BAD_ID = re.compile(r"^\.|[\s/\\\x00-\x1f\x7f]")
STATS = "stats.json"


@dataclass(frozen=True)
class NamedDataset:
    """One of the paper's four domains: the authors' file prefix, the Amazon 2023 category, the user fraction."""

    authors_prefix: str
    amazon_category: str
    user_fraction: float


NAMED_DATASETS: dict[str, NamedDataset] = {
    "arts": NamedDataset("arts", "Arts_Crafts_and_Sewing", 0.4),
    "sports": NamedDataset("sports_outdoors", "Sports_and_Outdoors", 0.2),
    "toys": NamedDataset("toys_games", "Toys_and_Games", 0.2),
    "beauty": NamedDataset("beauty_care", "Beauty_and_Personal_Care", 0.2),
}


def demo_directory() -> Path:
    """Where the demo world lives (generated from `DEMO_WORLD_SEED` on first use, then reused), keyed by
    the seed and the `DemoSpec` so that a changed world is never read from an old cache."""
    spec = json.dumps({"seed": DEMO_WORLD_SEED, **dataclasses.asdict(DemoSpec())}, sort_keys=True)
    return cache_root() / "demo" / hashlib.sha256(spec.encode()).hexdigest()[:12] / DEMO


def default_data_dir() -> Path:
    """Where named datasets live: ``$PERPEFT_DATA``, else ``cache_root()/data``."""
    configured = os.environ.get("PERPEFT_DATA")
    return Path(configured).expanduser() if configured else cache_root() / "data"


def load_dataset(data: str, data_dir: str | Path | None = None, text_fields: tuple[str, ...] | None = None) -> Dataset:
    """``demo`` (one fixed world: a run's ``--seed`` varies training, not the data, as in the paper), a named
    dataset (``arts``, ``sports``, ``toys``, ``beauty``, read from ``data_dir/NAME``, default
    `default_data_dir`) or a RecBole-style dataset directory; ``text_fields`` as `load_recbole` takes them.

    A name wins over a same-named directory in the working directory; write ``./arts`` for the latter.
    """
    if data == DEMO:
        directory = demo_directory()
        if not (directory / f"{DEMO}.inter").is_file():
            generate_demo(directory, DEMO_WORLD_SEED)
        return load_recbole(directory, text_fields)
    if data in NAMED_DATASETS:
        directory = (Path(data_dir).expanduser() if data_dir else default_data_dir()) / data
        if not (directory / f"{data}.inter").is_file():
            raise _not_prepared(data, directory)
        return load_recbole(directory, text_fields)
    path = Path(data).expanduser()
    if not path.exists():
        raise InputError(
            f"{path}: no such dataset directory (use --data demo, a named dataset"
            f" ({', '.join(NAMED_DATASETS)}) or a RecBole-style directory)"
        )
    return load_recbole(path, text_fields)


def run_dataset(config: RunConfig) -> Dataset:
    """The dataset a run trains on, with the item text its ``--text-fields`` choose (item-ID methods read
    no text)."""
    text_fields = () if method_of(config).encoder == "none" else config.text_field_names
    return load_dataset(config.data, config.data_dir, text_fields)


def _not_prepared(name: str, directory: Path) -> InputError:
    named = NAMED_DATASETS[name]
    category = named.amazon_category
    return InputError(
        f"{directory}: dataset {name!r} is not prepared (expected {name}.inter, {name}.item and images/ITEM_ID.jpg"
        f" there); prepare it from the authors' released files with `perpeft-engine prepare authors --src DIR"
        f" --name {name} --out {directory}` or from raw Amazon Reviews 2023 with `perpeft-engine prepare amazon2023"
        f" --reviews {category}.jsonl.gz --meta meta_{category}.jsonl.gz --images IMAGES"
        f" --user-fraction {named.user_fraction} --out {directory}`"
    )


@dataclass
class PreparedDataset:
    """A converted dataset before it is written; interaction rows are in output order.

    ``users``/``items`` index ``user_ids``/``item_ids``; ``images`` holds each item's verified source image
    (None: the item has none); ``dropped`` counts every input record left out, by reason.
    """

    user_ids: list[str]
    item_ids: list[str]
    titles: list[str]
    images: list[Path | None]
    users: np.ndarray
    items: np.ndarray
    stamps: np.ndarray
    dropped: dict[str, int]

    def stats(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The paper's Table 1 columns, missing modalities, drops by reason, and ``extra``."""
        users, items, interactions = len(self.user_ids), len(self.item_ids), len(self.users)
        return {
            "users": users,
            "items": items,
            "interactions": interactions,
            "avg_seq_len": interactions / users,
            "density": interactions / (users * items),
            "items_without_title": sum(1 for title in self.titles if not title),
            "items_without_image": sum(1 for image in self.images if image is None),
            "dropped": self.dropped,
            **extra,
        }


def normalise_title(title: str) -> str:
    """Whitespace runs (tabs and newlines included) become one space: the item file is TSV."""
    return " ".join(title.split())


def id_problem(field: str, value: object) -> str | None:
    """Why ``value`` cannot be a user or item id (ids are TSV fields and image file names), or None."""
    if not isinstance(value, str) or not value:
        return f"{field} is {'missing or null' if value is None else 'empty' if value == '' else 'not a string'}"
    if _BAD_ID.search(value):
        return f"{field} {value!r} has a leading dot, whitespace, a path separator or a control character"
    return None


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty ``out`` unless ``overwrite`` (checked before any work is done)."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: output exists; pass --overwrite to replace it")


def jpeg_sources(directory: Path, item_ids: list[str]) -> list[Path | None]:
    """``directory/ITEM.jpg`` for every item that has one, else None (one directory listing)."""
    present = {path.name for path in directory.iterdir()}
    return [directory / f"{item}.jpg" if f"{item}.jpg" in present else None for item in item_ids]


def verify_images(
    sources: list[Path | None], skip_bad_images: bool, progress: bool, threads: int = 4
) -> tuple[list[Path | None], int]:
    """Decode every image (in threads: Pillow decodes without the GIL); unreadable ones raise `InputError`,
    or with ``skip_bad_images`` become None. Returns the images and how many were unreadable."""
    present = [path for path in sources if path is not None]
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(_image_problem, present)
        problems = dict(
            zip(present, tqdm(results, total=len(present), desc="images", disable=not progress), strict=True)
        )
    bad = [path for path in present if problems[path] is not None]
    if bad and not skip_bad_images:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(f"{problems[bad[0]]}{more}; --skip-bad-images keeps such items without an image")
    return [None if path is None or problems[path] is not None else path for path in sources], len(bad)


def _image_problem(path: Path) -> str | None:
    try:
        check_image(path)
    except InputError as error:
        return str(error)
    return None


def write_prepared(out: Path, dataset: PreparedDataset, stats: dict[str, Any], overwrite: bool, progress: bool) -> None:
    """Write ``out`` (replacing it with ``overwrite``) atomically: everything goes to a staging directory first.

    Images are hard-linked into ``out/images/ITEM.jpg`` where the filesystem allows, else copied.
    """
    check_output(out, overwrite)
    name = out.resolve().name
    staging = temporary_directory_beside(out)
    try:
        _write_tsv(
            staging / f"{name}.item",
            (ITEM_COLUMN, TITLE_COLUMN),
            (f"{item}\t{title}" for item, title in zip(dataset.item_ids, dataset.titles, strict=True)),
        )
        _write_tsv(
            staging / f"{name}.inter",
            (USER_COLUMN, ITEM_COLUMN, TIME_COLUMN),
            (
                f"{dataset.user_ids[user]}\t{dataset.item_ids[item]}\t{stamp}"
                for user, item, stamp in zip(
                    dataset.users.tolist(), dataset.items.tolist(), dataset.stamps.tolist(), strict=True
                )
            ),
        )
        images = staging / "images"
        images.mkdir()
        pairs = [(item, path) for item, path in zip(dataset.item_ids, dataset.images, strict=True) if path is not None]
        for item, path in tqdm(pairs, desc="linking images", disable=not progress):
            _link_or_copy(path, images / f"{item}.jpg")
        missing = [item for item, path in zip(dataset.item_ids, dataset.images, strict=True) if path is None]
        if missing:
            (staging / MISSING_IMAGES).write_text("".join(f"{item}\n" for item in missing), encoding="utf-8")
        (staging / STATS).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_tsv(path: Path, header: tuple[str, ...], lines: Iterable[str]) -> None:
    with path.open("w", encoding="utf-8") as stream:
        stream.write("\t".join(header) + "\n")
        stream.writelines(line + "\n" for line in lines)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
