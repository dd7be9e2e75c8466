"""Dataset file formats: RecBole atomic files in, a `Dataset` out."""

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from perpeft.engine.data.dataset import Dataset
from perpeft.engine.errors import InputError

USER_COLUMN = "user_id:token"
ITEM_COLUMN = "item_id:token"
TIME_COLUMN = "timestamp:float"
DEFAULT_TEXT_FIELD = "title"  # the item text when --text-fields is not given
TITLE_COLUMN = f"{DEFAULT_TEXT_FIELD}:token_seq"  # the column `prepare` writes
TEXT_SEPARATOR = ". "  # between the values of several text fields
# RecBole's atomic-file column types (a header column is NAME:TYPE); text fields must be token or token_seq.
COLUMN_TYPES = ("token", "token_seq", "float", "float_seq")
TEXT_TYPES = ("token", "token_seq")
IMAGE_SUFFIXES = (".jpg", ".png")  # in order of preference
MISSING_IMAGES = "missing_images.txt"  # items declared to have no image (one id a line)


def load_recbole(directory: Path, text_fields: tuple[str, ...] | None = None) -> Dataset:
    """Load ``D/NAME.inter``, ``D/NAME.item`` and ``D/images/ITEM_ID.{jpg,png}`` (NAME = D's base name).

    Both files may hold any columns beside the ones read, each named ``NAME:TYPE`` as RecBole writes them.
    An item's text is its ``text_fields`` (names with or without their type, values joined by
    `TEXT_SEPARATOR`; default `DEFAULT_TEXT_FIELD`); an item file of ids only is a catalog without text.
    A dataset without ``D/images`` is a catalog without images. Otherwise an item listed in
    ``D/missing_images.txt`` may lack its image file (its image path is None, and the model uses a learned
    placeholder); any other item without an image file is an error.

    Items are numbered in item-file order, users in order of first appearance in the interaction file;
    each user's items are ordered by timestamp, ties kept in file order. Empty lines are skipped.
    Raises `InputError` on any malformed or missing input. Images are located, not decoded.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: dataset directory not found")
    name = directory.resolve().name
    item_ids, titles, image_paths = load_item_file(directory / f"{name}.item", text_fields)
    item_index = {item_id: index for index, item_id in enumerate(item_ids, start=1)}
    user_ids, sequences = _read_interactions(directory / f"{name}.inter", item_index)
    return Dataset(
        name=name,
        root=directory,
        item_ids=[None, *item_ids],
        titles=["", *titles],
        image_paths=[None, *image_paths],
        user_ids=[None, *user_ids],
        sequences=sequences,
    )


def load_item_file(
    path: Path, text_fields: tuple[str, ...] | None = None
) -> tuple[list[str], list[str], list[Path | None]]:
    """Item ids, texts and image files of the RecBole item file ``path``, read as `load_recbole` reads
    ``NAME.item``: images from ``images/`` beside it, ``missing_images.txt`` beside it declaring those
    that may lack one."""
    item_ids, titles = _read_items(path, text_fields)
    directory = path.parent
    return (
        item_ids,
        titles,
        _locate_images(directory / "images", item_ids, _declared_missing(directory / MISSING_IMAGES)),
    )


def check_image(path: Path) -> None:
    """Open and fully decode an image; raise `InputError` naming the file if that fails."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"{path}: unreadable image ({reason})") from error


def _read_lines(path: Path, what: str) -> list[str]:
    """All lines of a UTF-8 text file, without line endings (a final newline adds no line)."""
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from error
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise InputError(f"{path}: file is empty")
    return lines


def _header(path: Path, line: str, required: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Columns of a header line (each ``NAME:TYPE``, names distinct) and the positions of ``required``."""
    columns = line.split("\t")
    missing = [column for column in required if column not in columns]
    if missing:
        raise InputError(f"{path}: line 1: header lacks column(s) {', '.join(missing)} (found: {', '.join(columns)})")
    for column in columns:
        name, _, kind = column.partition(":")
        if not name or kind not in COLUMN_TYPES:
            raise InputError(
                f"{path}: line 1: column {column!r} is not NAME:TYPE with TYPE one of {', '.join(COLUMN_TYPES)}"
            )
    names = [column.partition(":")[0] for column in columns]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{path}: line 1: header repeats column(s) {', '.join(repeated)}")
    return columns, [columns.index(column) for column in required]


def _text_columns(path: Path, columns: list[str], text_fields: tuple[str, ...] | None) -> list[int]:
    """Positions of the item text's columns: ``text_fields`` (bare names or ``NAME:TYPE``), else
    `DEFAULT_TEXT_FIELD` when the file has it, else none when the file holds item ids only."""
    names = [column.partition(":")[0] for column in columns]
    others = [column for column in columns if column != ITEM_COLUMN]
    if text_fields is None:
        if DEFAULT_TEXT_FIELD in names:
            text_fields = (DEFAULT_TEXT_FIELD,)
        elif not others:
            return []
        else:
            raise InputError(
                f"{path}: no {DEFAULT_TEXT_FIELD!r} column for the item text; choose it with --text-fields"
                f" (item columns: {', '.join(others)})"
            )
    positions = []
    for field in text_fields:
        name = field.partition(":")[0]
        if name not in names or (":" in field and field not in columns):
            raise InputError(f"{path}: --text-fields: no column {field!r} (item columns: {', '.join(others)})")
        position = names.index(name)
        if columns[position] == ITEM_COLUMN or columns[position].partition(":")[2] not in TEXT_TYPES:
            raise InputError(f"{path}: --text-fields: column {columns[position]!r} is not a text column")
        positions.append(position)
    return positions


def _wrong_width(path: Path, line_number: int, expected: int, found: int) -> InputError:
    return InputError(f"{path}: line {line_number}: expected {expected} tab-separated fields, found {found}")


def _rows(path: Path, lines: list[str], width: int) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of every non-empty data line, each checked to have ``width`` fields."""
    for line_number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise _wrong_width(path, line_number, width, len(fields))
        yield line_number, fields


def _read_items(path: Path, text_fields: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """Item ids and texts in file order."""
    lines = _read_lines(path, "item")
    columns, (id_column,) = _header(path, lines[0], (ITEM_COLUMN,))
    text_columns = _text_columns(path, columns, text_fields)
    first_line_of: dict[str, int] = {}
    item_ids: list[str] = []
    titles: list[str] = []
    for line_number, fields in _rows(path, lines, len(columns)):
        item_id = fields[id_column]
        if item_id in first_line_of:
            raise InputError(
                f"{path}: line {line_number}: duplicate item id {item_id!r} (first on line {first_line_of[item_id]})"
            )
        first_line_of[item_id] = line_number
        item_ids.append(item_id)
        titles.append(TEXT_SEPARATOR.join(fields[column] for column in text_columns if fields[column].strip()))
    if not item_ids:
        raise InputError(f"{path}: no items after the header")
    return item_ids, titles


def _declared_missing(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({error})") from None


def _locate_images(images: Path, item_ids: list[str], declared_missing: set[str]) -> list[Path | None]:
    """The image file of every item, ``.jpg`` preferred over ``.png``; None for declared missing images."""
    if not images.is_dir():
        if declared_missing and len(declared_missing) < len(item_ids):
            raise InputError(f"{images}: image directory not found ({MISSING_IMAGES} lists only some items)")
        return [None] * len(item_ids)  # a catalog without images
    # One directory listing instead of a stat per item.
    present = set(os.listdir(images))
    paths: list[Path | None] = []
    for item_id in item_ids:
        name = next((item_id + suffix for suffix in IMAGE_SUFFIXES if item_id + suffix in present), None)
        if name is None and item_id not in declared_missing:
            raise InputError(
                f"{images / (item_id + IMAGE_SUFFIXES[0])}: missing image for item {item_id!r}"
                f" (neither {' nor '.join(item_id + suffix for suffix in IMAGE_SUFFIXES)} exists;"
                f" list it in {MISSING_IMAGES} to train without its image)"
            )
        paths.append(images / name if name else None)
    return paths


def _read_interactions(path: Path, item_index: dict[str, int]) -> tuple[list[str], list[np.ndarray]]:
    """User ids in order of first appearance and each user's items in time order (index 0 empty)."""
    lines = _read_lines(path, "interaction")
    columns, (user_column, item_column, time_column) = _header(path, lines[0], (USER_COLUMN, ITEM_COLUMN, TIME_COLUMN))
    user_index: dict[str, int] = {}
    users: list[int] = []
    items: list[int] = []
    stamps: list[float] = []
    for line_number, fields in _rows(path, lines, len(columns)):
        item = item_index.get(fields[item_column])
        if item is None:
            raise InputError(f"{path}: line {line_number}: item {fields[item_column]!r} is not in the item file")
        try:
            stamp = float(fields[time_column])
        except ValueError:
            stamp = math.nan
        if not math.isfinite(stamp):
            raise InputError(f"{path}: line {line_number}: timestamp {fields[time_column]!r} is not a finite number")
        users.append(user_index.setdefault(fields[user_column], len(user_index) + 1))
        items.append(item)
        stamps.append(stamp)
    if not users:
        raise InputError(f"{path}: no interactions after the header")

    user_array = np.array(users, dtype=np.int64)
    # Two stable sorts: by time, then by user, so equal timestamps keep their file order.
    order = np.argsort(np.array(stamps, dtype=np.float64), kind="stable")
    order = order[np.argsort(user_array[order], kind="stable")]
    ordered_items = np.array(items, dtype=np.int64)[order]
    counts = np.bincount(user_array, minlength=len(user_index) + 1)
    sequences = np.split(ordered_items, np.cumsum(counts)[:-1])
    return list(user_index), sequences
