"""In-memory tables → a prepared dataset directory (see `sources`): interactions and items as DataFrames.

Input: an interaction table (user, item, timestamp), an item table (item id and text columns) and
optionally a directory of ``ITEM_ID.jpg`` images. Choices, those of the authors' road (`authors`):

- Interactions are kept as they are: a repeated (user, item) pair is a repeat purchase and stays, and no
  k-core is applied (filter the tables first for that).
- Each user's items are ordered by timestamp, equal timestamps in row order; users are numbered in order
  of first appearance and the interaction file is written in that order, so `load_recbole` reads back
  exactly these sequences. Timestamps are written as given (integers stay integers).
- Items keep the item table's row order; items no interaction names are left out and counted
  (``dropped.items_unreferenced``).
- Ids are strings or integers (written in decimal). An item's title is its text columns' values
  (whitespace runs → one space, missing values skipped) joined by `TEXT_SEPARATOR`, as `load_recbole`
  joins several ``--text-fields``.
- An item without an image file is kept and listed in ``missing_images.txt``; an unreadable image is an
  error unless ``skip_bad_images``.

Errors name the table (``interactions`` or ``items``), the column and the row (its 0-based position, as
``.iloc`` counts).
"""

from collections.abc import Callable
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from perpeft.engine.data.formats import TEXT_SEPARATOR
from perpeft.engine.data.sources import (
    PreparedDataset,
    check_output,
    id_problem,
    jpeg_sources,
    normalise_title,
    verify_images,
    write_prepared,
)
from perpeft.engine.errors import InputError

if TYPE_CHECKING:
    import pandas

INTERACTIONS = "interactions"
ITEMS = "items"
INSTALL_HINT = "in-memory tables need pandas, in the optional extra 'pandas': pip install 'perpeft-engine[pandas]'"


def prepare_frames(
    interactions: "pandas.DataFrame",
    items: "pandas.DataFrame",
    out: Path,
    images: Path | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    text_cols: tuple[str, ...] = ("title",),
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the two tables (and ``images/ITEM_ID.jpg`` from ``images``) as the dataset directory ``out``;
    return the statistics written there."""
    try:
        import pandas
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    check_output(out, overwrite)
    if images is not None and not images.is_dir():
        raise InputError(f"{images}: image directory not found (an empty one keeps every item without image)")

    catalog = _ids(ITEMS, item_col, _column(items, ITEMS, item_col), pandas.isna)
    texts = [_column(items, ITEMS, column) for column in text_cols]
    users = _ids(INTERACTIONS, user_col, _column(interactions, INTERACTIONS, user_col), pandas.isna)
    bought = _ids(INTERACTIONS, item_col, _column(interactions, INTERACTIONS, item_col), pandas.isna)
    stamps = _timestamps(INTERACTIONS, time_col, _column(interactions, INTERACTIONS, time_col))

    item_row = _item_rows(catalog, item_col)
    item_rows = np.empty(len(bought), dtype=np.int64)
    for row, item in enumerate(bought):
        position = item_row.get(item)
        if position is None:
            raise InputError(f"{INTERACTIONS}: row {row}: {item_col} {item!r} is not in the {ITEMS} table")
        item_rows[row] = position
    user_ids: dict[str, int] = {}
    user_rows = np.array([user_ids.setdefault(user, len(user_ids)) for user in users], dtype=np.int64)

    used = np.unique(item_rows)  # the catalog, in the item table's row order
    item_ids = [catalog[row] for row in used.tolist()]
    present = [~pandas.isna(values) for values in texts]
    titles = [_title(texts, present, text_cols, row) for row in used.tolist()]
    sources: list[Path | None] = jpeg_sources(images, item_ids) if images is not None else [None] * len(item_ids)
    verified, unreadable = verify_images(sources, skip_bad_images, progress)
    order = np.lexsort((np.arange(len(users)), stamps, user_rows))

    dataset = PreparedDataset(
        user_ids=list(user_ids),
        item_ids=item_ids,
        titles=titles,
        images=verified,
        users=user_rows[order],
        items=np.searchsorted(used, item_rows[order]),
        stamps=stamps[order],
        dropped={"items_unreferenced": len(catalog) - len(used)},
    )
    columns = {"user": user_col, "item": item_col, "time": time_col, "text": list(text_cols)}
    stats = dataset.stats(
        {
            "source": {"road": "frames", "columns": columns, "images": None if images is None else str(images)},
            "images_unreadable": unreadable,
        }
    )
    write_prepared(out, dataset, stats, overwrite, progress)
    return stats


def _column(frame: "pandas.DataFrame", table: str, column: str) -> np.ndarray:
    """The values of ``frame[column]``; the table must have that column and at least one row."""
    if column not in frame.columns:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise InputError(f"{table}: no column {column!r} (columns: {found})")
    values = np.asarray(frame[column])
    if not len(values):
        raise InputError(f"{table}: no rows")
    return values


def _ids(table: str, column: str, values: np.ndarray, isna: Callable[[np.ndarray], np.ndarray]) -> list[str]:
    """The column's ids as strings (integers in decimal), each a valid id (`id_problem`)."""
    if values.dtype.kind in "iu":
        return values.astype(str).tolist()
    missing = np.flatnonzero(isna(values))
    if len(missing):
        raise InputError(f"{table}: row {missing[0]}: {column} is missing")
    ids: list[str] = []
    valid: set[str] = set()
    for row, value in enumerate(values.tolist()):
        if isinstance(value, Integral) and not isinstance(value, bool):
            value = str(int(value))
        elif not isinstance(value, str):
            raise InputError(f"{table}: row {row}: {column} {value!r} is not a string or an integer")
        if value not in valid:
            problem = id_problem(column, value)
            if problem:
                raise InputError(f"{table}: row {row}: {problem}")
            valid.add(value)
        ids.append(value)
    return ids


def _item_rows(catalog: list[str], column: str) -> dict[str, int]:
    """Each item id's row in the item table; an id on two rows is refused."""
    rows: dict[str, int] = {}
    for row, item in enumerate(catalog):
        first = rows.setdefault(item, row)
        if first != row:
            raise InputError(f"{ITEMS}: row {row}: duplicate {column} {item!r} (first on row {first})")
    return rows


def _timestamps(table: str, column: str, values: np.ndarray) -> np.ndarray:
    """The column as int64 (integers) or float64 (any other real number); every value finite."""
    if values.dtype.kind == "O":
        for row, value in enumerate(values.tolist()):
            if not isinstance(value, Real) or isinstance(value, bool):
                raise InputError(f"{table}: row {row}: {column} {value!r} is not a number")
        values = np.array(values.tolist())
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise InputError(
            f"{table}: column {column!r} holds {values.dtype} values, not numbers (e.g. seconds since the epoch)"
        )
    stamps = values.astype(np.float64)
    infinite = np.flatnonzero(~np.isfinite(stamps))
    if len(infinite):
        row = int(infinite[0])
        raise InputError(f"{table}: row {row}: {column} {stamps[row]} is not a finite number")
    return stamps


def _title(texts: list[np.ndarray], present: list[np.ndarray], columns: tuple[str, ...], row: int) -> str:
    """Item ``row``'s text: its present, non-blank text values, normalised, joined by `TEXT_SEPARATOR`."""
    parts = []
    for values, given, column in zip(texts, present, columns, strict=True):
        if not given[row]:
            continue
        value = values[row]
        if not isinstance(value, str):
            raise InputError(f"{ITEMS}: row {row}: {column} {value!r} is a {type(value).__name__}, not a string")
        if text := normalise_title(value):
            parts.append(text)
    return TEXT_SEPARATOR.join(parts)
