"""Road 2: raw Amazon Reviews 2023 JSONL → a prepared dataset directory (see `sources`), as in App. B.2.

1. Reviews (``user_id``, ``parent_asin``, ``timestamp`` in ms) are streamed; a user is kept when a stable
   hash of (seed, user_id) falls below ``user_fraction`` (`user_sampled`). That is decided line by line,
   so no table of all users is held (memory grows with the kept interactions, not the file), and the
   users kept at one fraction are among those kept at any larger one (same seed).
2. One interaction per (user, parent_asin): the earliest (equal times: the first line).
3. Iterative 5-core: users and items with fewer than 5 interactions are dropped until none is left.
4. Meta is streamed for the kept items' titles (whitespace runs → one space; null, empty, not a string or
   no meta record → "", counted in ``items_without_title``).
5. Each item's image is ``IMAGES/PARENT_ASIN.jpg`` (what fetch-images writes). Absent → the item is kept
   without image (``items_without_image``, ``missing_images.txt``); unreadable → `InputError`, or with
   ``skip_bad_images`` the same as absent, also counted in ``images_unreadable``.

Output: users and items in id order; each user's purchases by timestamp (equal times in file order),
timestamps kept in ms. Every input line is accounted for: ``stats["reviews"]["lines"]`` equals
``kept`` plus the ``dropped`` review counts, and each meta line is used, unused or dropped.
"""

import gzip
import hashlib
import json
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

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

CORE = 5
_GZIP_MAGIC = b"\x1f\x8b"
_PROGRESS_EVERY = 65_536  # lines between progress-bar updates


class JsonLines:
    """The JSON objects of a JSONL file, gzip'ed or not (told by its first bytes), with their line numbers.

    Blank lines are skipped. A line that is not a JSON object raises `InputError` naming file and line,
    or with ``skip_bad_lines`` is counted in ``malformed``; callers refuse records with unusable fields
    through `reject` (counted in ``invalid``). A truncated or corrupt gzip stream always raises: the
    records lost with it could not be counted.
    """

    def __init__(self, path: Path, skip_bad_lines: bool, progress: bool, label: str) -> None:
        self.path = path
        self.skip_bad_lines = skip_bad_lines
        self.progress = progress
        self.label = label
        self.lines = self.malformed = self.invalid = 0

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            raw = self.path.open("rb")
        except OSError as error:
            raise InputError(f"{self.path}: cannot open ({error.strerror})") from error
        size = self.path.stat().st_size
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=self.label, disable=not self.progress)
        with raw, bar:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if compressed else raw
            number = 0
            try:
                for number, line in enumerate(stream, start=1):
                    if number % _PROGRESS_EVERY == 0:
                        bar.update(raw.tell() - bar.n)
                    if line.isspace():
                        continue
                    self.lines += 1
                    record = self._parse(number, line)
                    if record is not None:
                        yield number, record
            except (EOFError, OSError, zlib.error) as error:
                kind = "truncated or corrupt gzip stream" if compressed else "read error"
                reason = " ".join(str(error).split()) or type(error).__name__
                raise InputError(f"{self.path}: {kind} after line {number} ({reason})") from error
            bar.update(size - bar.n)

    def _parse(self, number: int, line: bytes) -> dict[str, Any] | None:
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except (ValueError, RecursionError) as error:
            problem = f"not valid JSON ({getattr(error, 'msg', type(error).__name__)})"
        else:
            if isinstance(record, dict):
                return record
            problem = f"a JSON {type(record).__name__}, not an object"
        if not self.skip_bad_lines:
            raise InputError(f"{self.path}: line {number}: {problem}; --skip-bad-lines skips and counts such lines")
        self.malformed += 1
        return None

    def reject(self, number: int, problem: str) -> None:
        """Refuse the record on line ``number``: `InputError`, or counted with ``skip_bad_lines``."""
        if not self.skip_bad_lines:
            raise InputError(f"{self.path}: line {number}: {problem}; --skip-bad-lines skips and counts such lines")
        self.invalid += 1


def user_sampled(user_id: str, seed: int, user_fraction: float) -> bool:
    """Whether ``user_id`` is in the seeded subsample: the first 8 bytes of BLAKE2b("SEED\\0USER_ID"),
    read as a big-endian fraction of 2**64, are below ``user_fraction``."""
    digest = hashlib.blake2b(f"{seed}\0{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < user_fraction * 2**64


def prepare_amazon2023(
    reviews: Path,
    meta: Path,
    images: Path,
    out: Path,
    user_fraction: float = 0.4,
    seed: int = 0,
    skip_bad_lines: bool = False,
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Pre-process one Amazon Reviews 2023 domain into ``out``; return the statistics written there."""
    if not 0.0 < user_fraction <= 1.0:
        raise InputError(f"--user-fraction must be in (0, 1], got {user_fraction}")
    check_output(out, overwrite)
    if not images.is_dir():
        raise InputError(f"{images}: image directory not found (an empty one keeps every item without image)")

    review_lines = JsonLines(reviews, skip_bad_lines, progress, "reviews")
    user_names, item_names, rows, not_sampled = _sampled_reviews(review_lines, seed, user_fraction)
    sampled = len(rows[0])
    rows = _earliest_per_pair(*rows)
    deduplicated = len(rows[0])
    rows, rounds = _core(*rows)
    if not len(rows[0]):
        raise InputError(
            f"{reviews}: nothing is left after {CORE}-core filtering ({len(user_names)} sampled users,"
            f" {deduplicated} distinct purchases); more data or a larger --user-fraction is needed"
        )
    users, items, stamps, order = rows
    user_ids, users = _renumber(user_names, users)
    item_ids, items = _renumber(item_names, items)
    chronological = np.lexsort((order, stamps, users))

    meta_lines = JsonLines(meta, skip_bad_lines, progress, "meta")
    titles, unused, meta_duplicates = _titles(meta_lines, item_ids)
    sources = jpeg_sources(images, item_ids)
    verified, unreadable = verify_images(sources, skip_bad_images, progress)

    dataset = PreparedDataset(
        user_ids=user_ids,
        item_ids=item_ids,
        titles=[title or "" for title in titles],
        images=verified,
        users=users[chronological],
        items=items[chronological],
        stamps=stamps[chronological],
        dropped={
            "review_lines_malformed": review_lines.malformed,
            "review_lines_invalid": review_lines.invalid,
            "reviews_user_not_sampled": not_sampled,
            "reviews_duplicate": sampled - deduplicated,
            "reviews_below_5_core": deduplicated - len(users),
            "users_below_5_core": len(user_names) - len(user_ids),
            "items_below_5_core": len(item_names) - len(item_ids),
            "meta_lines_malformed": meta_lines.malformed,
            "meta_lines_invalid": meta_lines.invalid,
            "meta_records_duplicate": meta_duplicates,
        },
    )
    stats = dataset.stats(
        {
            "reviews": {"lines": review_lines.lines, "kept": len(users)},
            "meta": {"lines": meta_lines.lines, "used": len(item_ids) - titles.count(None), "unused": unused},
            "users_sampled": len(user_names),
            "core_rounds": rounds,
            "items_without_meta": titles.count(None),
            "images_unreadable": unreadable,
            "settings": {"user_fraction": user_fraction, "seed": seed, "core": CORE},
            "source": {"road": "amazon2023", "reviews": str(reviews), "meta": str(meta), "images": str(images)},
        }
    )
    write_prepared(out, dataset, stats, overwrite, progress)
    return stats


def _timestamp_problem(value: object) -> str | None:
    if type(value) is int or (type(value) is float and value.is_integer()):
        return None
    return f"timestamp {value!r} is not a whole number of milliseconds"


def _sampled_reviews(
    lines: JsonLines, seed: int, user_fraction: float
) -> tuple[list[str], list[str], tuple[np.ndarray, ...], int]:
    """Sampled users' and their items' names, and the rows (user, item, timestamp, line order) of their reviews."""
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    users, items, stamps = array("q"), array("q"), array("q")
    not_sampled = 0
    for number, record in lines:
        user, item, stamp = record.get("user_id"), record.get("parent_asin"), record.get("timestamp")
        problem = id_problem("user_id", user) or id_problem("parent_asin", item) or _timestamp_problem(stamp)
        if problem:
            lines.reject(number, problem)
            continue
        # For the type checker: id_problem passes only strings, _timestamp_problem only whole numbers.
        assert isinstance(user, str) and isinstance(item, str) and isinstance(stamp, int | float)
        position = user_index.get(user)
        if position is None:
            if not user_sampled(user, seed, user_fraction):
                not_sampled += 1
                continue
            position = user_index[user] = len(user_index)
        users.append(position)
        items.append(item_index.setdefault(item, len(item_index)))
        stamps.append(int(stamp))
    columns = tuple(np.frombuffer(column, dtype=np.int64) for column in (users, items, stamps))
    return list(user_index), list(item_index), (*columns, np.arange(len(users))), not_sampled


def _earliest_per_pair(*rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keep each (user, item)'s earliest row (equal times: the first line); rows stay in line order."""
    users, items, stamps, order = rows
    ranked = np.lexsort((order, stamps, items, users))
    first = np.ones(len(ranked), dtype=bool)
    first[1:] = (np.diff(users[ranked]) != 0) | (np.diff(items[ranked]) != 0)
    keep = np.sort(ranked[first])
    return tuple(column[keep] for column in rows)


def _core(*rows: np.ndarray) -> tuple[tuple[np.ndarray, ...], int]:
    """Drop rows of users or items with fewer than `CORE` rows until none; also return the rounds that dropped."""
    rounds = 0
    while True:
        users, items = rows[0], rows[1]
        keep = (np.bincount(users)[users] >= CORE) & (np.bincount(items)[items] >= CORE)
        if keep.all():
            return rows, rounds
        rows = tuple(column[keep] for column in rows)
        rounds += 1


def _renumber(names: list[str], positions: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The surviving names in sorted order, and ``positions`` (indices into ``names``) as indices into them."""
    survivors = np.unique(positions)
    order = sorted(range(len(survivors)), key=lambda k: names[survivors[k]])
    rank = np.empty(len(survivors), dtype=np.int64)
    rank[order] = np.arange(len(survivors))
    return [names[survivors[k]] for k in order], rank[np.searchsorted(survivors, positions)]


def _titles(lines: JsonLines, item_ids: list[str]) -> tuple[list[str | None], int, int]:
    """Each item's title from its first meta record (None: no record), unused and duplicate record counts."""
    position = {item: k for k, item in enumerate(item_ids)}
    titles: list[str | None] = [None] * len(item_ids)
    unused = duplicates = 0
    for number, record in lines:
        item = record.get("parent_asin")
        problem = id_problem("parent_asin", item)
        if problem:
            lines.reject(number, problem)
            continue
        assert isinstance(item, str)  # for the type checker: id_problem passes only strings
        k = position.get(item)
        if k is None:
            unused += 1
        elif titles[k] is not None:
            duplicates += 1
        else:
            title = record.get("title")
            titles[k] = normalise_title(title) if isinstance(title, str) else ""
    return titles, unused, duplicates
