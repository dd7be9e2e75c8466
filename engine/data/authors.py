"""Road 1: the authors' released files → a prepared dataset directory (see `sources`).

Input, for PREFIX the paper's ``arts``, ``sports_outdoors``, ``toys_games``, ``beauty_care`` or any other
release in the same layout (`detect_prefix` finds it when ``SRC`` holds one):

- ``SRC/PREFIX_final.txt``: lines "user item", 1-based ids, each user's purchases in time order;
- ``SRC/PREFIX_item2id_final.pickle``: item index → item key (the ASIN; the authors' code maps index i to
  the i-th value);
- ``SRC/PREFIX_texts_final.pickle``: item key → title;
- ``SRC/PREFIX_images/KEY.jpg`` (without that directory: a catalog without images).

Choices:

- The released file has no times. An interaction's timestamp is its line number: each user's lines are in
  purchase order, so sorting by it gives back exactly the authors' sequences, with no ties.
- Item ids are the item keys; items are written in the authors' index order and users keep the authors'
  ids, so with all indices 1..N used (as released) engine item index = authors' index.
- Interactions are kept as they are (the authors already filtered them); item2id entries that no
  interaction uses are left out and counted (``dropped.items_unreferenced``).
- A missing title becomes "" (the authors' code used "No description available."); a missing image is
  kept and listed in ``missing_images.txt``; an unreadable image is an error unless ``skip_bad_images``.
- Pickles are read with `load_plain_pickle`: plain data only.
"""

from pathlib import Path
from typing import Any

import numpy as np

from perpeft.engine.data.safe_pickle import load_plain_pickle
from perpeft.engine.data.sources import (
    NAMED_DATASETS,
    PreparedDataset,
    check_output,
    id_problem,
    jpeg_sources,
    normalise_title,
    verify_images,
    write_prepared,
)
from perpeft.engine.errors import InputError

AUTHORS_PREFIXES = {named.authors_prefix: name for name, named in NAMED_DATASETS.items()}


FINAL_SUFFIX = "_final.txt"


def authors_prefix(name: str) -> str:
    """The file prefix of a release: a named dataset's (``sports`` → ``sports_outdoors``), else ``name``."""
    if name in NAMED_DATASETS:
        return NAMED_DATASETS[name].authors_prefix
    problem = id_problem("--name", name)
    if problem:
        raise InputError(f"{problem}: expected a dataset name or a file prefix")
    return name


def detect_prefix(src: Path) -> str:
    """The prefix of the one release in ``src`` (``PREFIX_final.txt`` beside ``PREFIX_item2id_final.pickle``)."""
    if not src.is_dir():
        raise InputError(f"{src}: directory not found")
    prefixes = sorted(
        path.name.removesuffix(FINAL_SUFFIX)
        for path in src.glob(f"*{FINAL_SUFFIX}")
        if (src / f"{path.name.removesuffix(FINAL_SUFFIX)}_item2id_final.pickle").is_file()
    )
    if not prefixes:
        raise InputError(f"{src}: no release found (expected PREFIX_final.txt and PREFIX_item2id_final.pickle)")
    if len(prefixes) > 1:
        raise InputError(f"{src}: holds the releases {', '.join(prefixes)}; choose one with --name")
    return prefixes[0]


def release_prefix(src: Path, name: str | None) -> str:
    """The prefix of the release ``name`` (a dataset name or file prefix), or of the one in ``src``."""
    return detect_prefix(src) if name is None else authors_prefix(name)


def default_output_name(prefix: str) -> str:
    """The dataset directory name of a release: a named dataset's short name, else its prefix."""
    return AUTHORS_PREFIXES.get(prefix, prefix)


def prepare_authors(
    src: Path,
    name: str | None,
    out: Path,
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Convert the release ``name`` (a dataset name or file prefix; None: the one in ``src``) into ``out``;
    return the statistics written there."""
    check_output(out, overwrite)
    prefix = release_prefix(src, name)
    index_to_key = _item_keys(src / f"{prefix}_item2id_final.pickle")
    texts_path = src / f"{prefix}_texts_final.pickle"
    texts = load_plain_pickle(texts_path)
    if not isinstance(texts, dict):
        raise InputError(f"{texts_path}: expected a dict of item key → title, found a {type(texts).__name__}")
    user_ids, users, indices, line_numbers = _read_interactions(src / f"{prefix}_final.txt", index_to_key)

    used = np.unique(indices)  # the catalog, in the authors' index order
    item_ids = [str(index_to_key[index]) for index in used.tolist()]
    _check_distinct_keys(src / f"{prefix}_item2id_final.pickle", used.tolist(), item_ids)
    titles = [_title(texts_path, texts, index_to_key[index]) for index in used.tolist()]
    image_dir = src / f"{prefix}_images"
    # A release without an image directory is a catalog without images (it trains on text only).
    sources: list[Path | None] = jpeg_sources(image_dir, item_ids) if image_dir.is_dir() else [None] * len(item_ids)
    images, unreadable = verify_images(sources, skip_bad_images, progress)

    dataset = PreparedDataset(
        user_ids=user_ids,
        item_ids=item_ids,
        titles=titles,
        images=images,
        users=users,
        items=np.searchsorted(used, indices),
        stamps=line_numbers,
        dropped={"items_unreferenced": len(index_to_key) - len(used)},
    )
    stats = dataset.stats(
        {
            "source": {"road": "authors", "src": str(src), "prefix": prefix, "timestamps": "line number"},
            "images_unreadable": unreadable,
        }
    )
    write_prepared(out, dataset, stats, overwrite, progress)
    return stats


def _item_keys(path: Path) -> dict[int, Any]:
    """The item2id pickle: a dict of positive int index → item key (str or int)."""
    mapping = load_plain_pickle(path)
    if not isinstance(mapping, dict):
        raise InputError(f"{path}: expected a dict of item index → item key, found a {type(mapping).__name__}")
    for index, key in mapping.items():
        if type(index) is not int or index < 1:
            raise InputError(f"{path}: item index {index!r} is not a positive integer")
        problem = id_problem(f"key of item {index}", str(key) if type(key) is int else key)
        if problem:
            raise InputError(f"{path}: {problem}")
    return mapping


def _read_interactions(
    path: Path, index_to_key: dict[int, Any]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """User ids in order of first line, and each interaction's user position, authors' item index and line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise InputError(f"{path}: interaction file not found") from error
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read as UTF-8 text ({error})") from error
    user_position: dict[str, int] = {}
    users: list[int] = []
    items: list[int] = []
    numbers: list[int] = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(field.isascii() and field.isdigit() and int(field) > 0 for field in fields):
            raise InputError(f"{path}: line {number}: expected 'user item' (two positive integers), found {line!r}")
        user, item = fields[0], int(fields[1])
        if item not in index_to_key:
            raise InputError(f"{path}: line {number}: item {item} is not in the item2id pickle")
        users.append(user_position.setdefault(str(int(user)), len(user_position)))
        items.append(item)
        numbers.append(number)
    if not users:
        raise InputError(f"{path}: no interactions")
    user_column, item_column, number_column = (np.array(column, dtype=np.int64) for column in (users, items, numbers))
    return list(user_position), user_column, item_column, number_column


def _check_distinct_keys(path: Path, indices: list[int], keys: list[str]) -> None:
    first: dict[str, int] = {}
    for index, key in zip(indices, keys, strict=True):
        if key in first:
            raise InputError(f"{path}: items {first[key]} and {index} share the key {key!r}")
        first[key] = index


def _title(path: Path, texts: dict, key: Any) -> str:
    """The item's title, "" when absent or null; anything but a string is refused."""
    title = texts.get(key)
    if title is None:
        return ""
    if not isinstance(title, str):
        raise InputError(f"{path}: title of item {key!r} is a {type(title).__name__}, not a string")
    return normalise_title(title)
