"""`prepare_amazon2023`: App. B.2 on raw Amazon Reviews 2023 files, and every kind of bad input."""

import gzip
import io
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from perpeft.engine.data.amazon import prepare_amazon2023, user_sampled
from perpeft.engine.data.formats import load_recbole

DAY_MS = 86_400_000


def jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def review(user: str, item: str, stamp: int, **extra: object) -> str:
    return json.dumps({"rating": 5.0, "user_id": user, "parent_asin": item, "timestamp": stamp, **extra})


def meta_record(item: str, title: object = "A title", **extra: object) -> str:
    images = [{"thumb": f"t/{item}", "large": f"l/{item}", "hi_res": None, "variant": "MAIN"}]
    return json.dumps({"parent_asin": item, "title": title, "images": images, **extra})


def block(users: list[str], items: list[str], start: int = 0) -> list[str]:
    """Every user buys every item, one day apart: a set that survives 5-core when both lists have >= 5."""
    return [review(u, i, start + k * DAY_MS) for u in users for k, i in enumerate(items)]


USERS5 = [f"U{k}" for k in range(5)]
ITEMS5 = [f"I{k}" for k in range(5)]


def write_images(directory: Path, items: list[str]) -> Path:
    directory.mkdir(exist_ok=True)
    for item in items:
        (directory / f"{item}.jpg").write_bytes(jpeg())
    return directory


def prepare(tmp_path: Path, reviews: list[str | bytes], meta: list[str] | None = None, **options: object) -> dict:
    reviews_path = write_lines(tmp_path / "reviews.jsonl", reviews)
    meta_path = write_lines(tmp_path / "meta.jsonl", meta if meta is not None else [meta_record(i) for i in ITEMS5])
    images = tmp_path / "images"
    if not images.exists():
        write_images(images, ITEMS5)
    options = {"user_fraction": 1.0, **options}
    return prepare_amazon2023(reviews_path, meta_path, images, tmp_path / "out", **options)


# --- acceptance: statistics equal an independent, obviously correct count -------------------------------


def synthetic_domain(rng: random.Random) -> list[dict]:
    """~60 users and ~40 items with duplicates, users and items below 5-core, and a removal cascade."""
    records = []
    core_items = [f"B{k:02d}" for k in range(30)]
    for u in range(50):  # regular users: 4-12 purchases among the core items
        for item in rng.sample(core_items, rng.randint(4, 12)):
            records.append({"user_id": f"R{u:02d}", "parent_asin": item, "timestamp": rng.randrange(10**6) * 1000})
    for u in range(20):  # baskets: three items bought at the same time (then the line order counts)
        for item in rng.sample(core_items, 3):
            records.append({"user_id": f"R{u:02d}", "parent_asin": item, "timestamp": 9_000_000})
    for u in range(8):  # a few buys of rare items (fewer than 5 buyers each)
        records.append({"user_id": f"R{u:02d}", "parent_asin": f"RARE{u % 3}", "timestamp": 5_000_000 + u})
    # A cascade: C0 has exactly 5 purchases, one of them RARE0; CHAIN is bought by C0..C4 only, so it falls
    # once C0 falls, and then C1..C4 (5 purchases each, CHAIN included) fall with it.
    for c in range(5):
        chain = ["CHAIN", *(["RARE0"] if c == 0 else [core_items[c]]), *core_items[10 + c : 13 + c]]
        for k, item in enumerate(chain):
            records.append({"user_id": f"C{c}", "parent_asin": item, "timestamp": 7_000_000 + k})
    # Re-purchases at a random time or at the very same time (then the first line counts as earlier).
    repeated = rng.sample(records, 40)
    duplicates = [dict(r, timestamp=rng.choice([r["timestamp"], rng.randrange(10**6) * 1000])) for r in repeated]
    records += duplicates
    rng.shuffle(records)
    return records


def independent_count(records: list[dict], fraction: float, seed: int) -> dict:
    """Sample, keep each (user, item)'s earliest line, 5-core until stable, order by time then line."""
    earliest: dict[tuple[str, str], tuple[int, int]] = {}
    for line, r in enumerate(records):
        if user_sampled(r["user_id"], seed, fraction):
            pair = (r["user_id"], r["parent_asin"])
            if pair not in earliest or r["timestamp"] < earliest[pair][0]:
                earliest[pair] = (r["timestamp"], line)
    pairs = set(earliest)
    sampled_users = {u for u, _ in pairs}
    sampled_items = {i for _, i in pairs}
    rounds = 0
    while True:
        users, items = Counter(u for u, _ in pairs), Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if users[u] >= 5 and items[i] >= 5}
        if kept == pairs:
            break
        pairs, rounds = kept, rounds + 1
    users = sorted({u for u, _ in pairs})
    items = sorted({i for _, i in pairs})
    sequences = {u: [i for _, i in sorted((earliest[(v, i)], i) for v, i in pairs if v == u)] for u in users}
    sampled_lines = sum(user_sampled(r["user_id"], seed, fraction) for r in records)
    return {
        "users": len(users),
        "items": len(items),
        "interactions": len(pairs),
        "avg_seq_len": len(pairs) / len(users),
        "density": len(pairs) / (len(users) * len(items)),
        "reviews_user_not_sampled": len(records) - sampled_lines,
        "reviews_duplicate": sampled_lines - len(earliest),
        "reviews_below_5_core": len(earliest) - len(pairs),
        "users_below_5_core": len(sampled_users) - len(users),
        "items_below_5_core": len(sampled_items) - len(items),
        "rounds": rounds,
        "sequences": sequences,
    }


@pytest.mark.parametrize("fraction", [1.0, 0.8])
def test_statistics_equal_an_independent_count(tmp_path: Path, fraction: float) -> None:
    records = synthetic_domain(random.Random(7))
    expected = independent_count(records, fraction, seed=3)
    assert expected["rounds"] >= 2 and expected["reviews_duplicate"] > 0 and expected["items_below_5_core"] > 0
    items = sorted({r["parent_asin"] for r in records})
    reviews = write_lines(tmp_path / "reviews.jsonl.gz", [json.dumps(r) for r in records])
    meta = write_lines(tmp_path / "meta.jsonl.gz", [meta_record(item, f"Title of {item}") for item in items])
    images = write_images(tmp_path / "images", items)

    stats = prepare_amazon2023(reviews, meta, images, tmp_path / "out", user_fraction=fraction, seed=3)

    for key in ("users", "items", "interactions", "avg_seq_len", "density"):
        assert stats[key] == pytest.approx(expected[key]), key
    for key in ("reviews_user_not_sampled", "reviews_duplicate", "reviews_below_5_core"):
        assert stats["dropped"][key] == expected[key], key
    assert stats["dropped"]["users_below_5_core"] == expected["users_below_5_core"]
    assert stats["dropped"]["items_below_5_core"] == expected["items_below_5_core"]
    assert stats["core_rounds"] == expected["rounds"]
    review_drops = sum(count for reason, count in stats["dropped"].items() if reason.startswith("review"))
    assert stats["reviews"]["lines"] == len(records) == review_drops + stats["reviews"]["kept"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats

    dataset = load_recbole(tmp_path / "out")
    loaded = {
        dataset.user_ids[u]: [dataset.item_ids[i] for i in dataset.sequences[u]]
        for u in range(1, len(dataset.user_ids))
    }
    assert loaded == expected["sequences"]
    assert dataset.titles[1:] == [f"Title of {item}" for item in dataset.item_ids[1:]]


def test_subsample_is_pinned_nested_and_close_to_the_fraction() -> None:
    users = [f"user{k}" for k in range(4000)]
    half = {u for u in users if user_sampled(u, 0, 0.5)}
    fifth = {u for u in users if user_sampled(u, 0, 0.2)}
    assert fifth < half
    assert abs(len(half) / len(users) - 0.5) < 0.03 and abs(len(fifth) / len(users) - 0.2) < 0.03
    assert {u for u in users if user_sampled(u, 1, 0.5)} != half
    # Pinned: the same seed must select the same users in every version.
    assert [u for u in users[:12] if u in half] == ["user0", "user1", "user3", "user4", "user6", "user9", "user11"]


def test_duplicate_purchase_keeps_the_earliest(tmp_path: Path) -> None:
    lines = [*block(USERS5, ITEMS5, start=10 * DAY_MS), review("U0", "I4", 0), review("U0", "I4", 20 * DAY_MS)]
    stats = prepare(tmp_path, lines)
    assert stats["dropped"]["reviews_duplicate"] == 2
    dataset = load_recbole(tmp_path / "out")
    u0 = dataset.user_ids.index("U0")
    assert [dataset.item_ids[i] for i in dataset.sequences[u0]] == ["I4", "I0", "I1", "I2", "I3"]


# --- bad input -------------------------------------------------------------------------------------------


def test_malformed_json_line_is_an_error_naming_file_and_line(tmp_path: Path, error_of: Callable[..., str]) -> None:
    bad = ['{"user_id": "U9", "parent_asin": ', "[1, 2]", b'{"user_id": "\xff\xfe"}', "[" * 100_000]
    lines = [*block(USERS5, ITEMS5), "", *bad]
    message = error_of(prepare, tmp_path, lines)
    assert "reviews.jsonl: line 27: not valid JSON" in message and "--skip-bad-lines" in message
    assert "line 27: a JSON list, not an object" in error_of(prepare, tmp_path, [*lines[:26], *bad[1:]])
    assert "line 27: not UTF-8" in error_of(prepare, tmp_path, [*lines[:26], *bad[2:]])

    stats = prepare(tmp_path, lines, skip_bad_lines=True)
    assert stats["dropped"]["review_lines_malformed"] == 4
    assert stats["reviews"] == {"lines": 29, "kept": 25}  # the blank line is no record


def test_missing_or_invalid_fields_are_an_error_or_counted(tmp_path: Path, error_of: Callable[..., str]) -> None:
    bad = [
        json.dumps({"user_id": "U0", "timestamp": 5}),
        json.dumps({"user_id": None, "parent_asin": "I0", "timestamp": 5}),
        review("U0", "I0", "yesterday"),  # type: ignore[arg-type]
        review("U0", "../etc", 5),
        review("U 0", "I0", 5),
        review("U0", "I0", True),  # type: ignore[arg-type]
    ]
    message = error_of(prepare, tmp_path, [*block(USERS5, ITEMS5), *bad])
    assert "reviews.jsonl: line 26: parent_asin is missing or null" in message

    stats = prepare(tmp_path, [*block(USERS5, ITEMS5), *bad], skip_bad_lines=True)
    assert stats["dropped"]["review_lines_invalid"] == len(bad)
    assert stats["interactions"] == 25


def test_truncated_gzip_is_an_error_even_when_skipping_bad_lines(tmp_path: Path, error_of: Callable[..., str]) -> None:
    reviews = write_lines(tmp_path / "reviews.jsonl.gz", block(USERS5, ITEMS5))
    reviews.write_bytes(reviews.read_bytes()[:-30])
    meta = write_lines(tmp_path / "meta.jsonl", [meta_record(i) for i in ITEMS5])
    images = write_images(tmp_path / "images", ITEMS5)
    message = error_of(prepare_amazon2023, reviews, meta, images, tmp_path / "out", 1.0, skip_bad_lines=True)
    assert f"{reviews}: truncated or corrupt gzip stream after line" in message
    assert not (tmp_path / "out").exists()


def test_titles_null_empty_odd_or_without_meta_are_empty_and_counted(
    tmp_path: Path, error_of: Callable[..., str]
) -> None:
    meta = [
        meta_record("I0", None),
        meta_record("I1", "  "),
        meta_record("I2", 42),
        meta_record("I3", "Tab\tand\nnewline"),
        meta_record("I3", "A later duplicate record"),
        meta_record("Z9", "An item nobody kept"),
        json.dumps({"title": "no id"}),
    ]
    message = error_of(prepare, tmp_path, block(USERS5, ITEMS5), meta)
    assert "meta.jsonl: line 7: parent_asin is missing or null" in message

    stats = prepare(tmp_path, block(USERS5, ITEMS5), meta, skip_bad_lines=True)
    assert stats["items_without_title"] == 4 and stats["items_without_meta"] == 1
    assert stats["dropped"]["meta_records_duplicate"] == 1 and stats["dropped"]["meta_lines_invalid"] == 1
    assert stats["meta"] == {"lines": 7, "used": 4, "unused": 1}
    assert load_recbole(tmp_path / "out").titles == ["", "", "", "", "Tab and newline", ""]


def test_missing_image_is_kept_counted_and_listed(tmp_path: Path) -> None:
    write_images(tmp_path / "images", ITEMS5[1:])
    stats = prepare(tmp_path, block(USERS5, ITEMS5))
    assert (stats["items"], stats["items_without_image"], stats["images_unreadable"]) == (5, 1, 0)
    assert (tmp_path / "out" / "missing_images.txt").read_text() == "I0\n"
    assert sorted(path.name for path in (tmp_path / "out" / "images").iterdir()) == [f"{i}.jpg" for i in ITEMS5[1:]]
    # The loader keeps the declared missing-image item, with no image path.
    dataset = load_recbole(tmp_path / "out")
    assert [path is None for path in dataset.image_paths[1:]].count(True) == 1
    assert dataset.image_paths[dataset.item_ids.index("I0")] is None


@pytest.mark.parametrize("content", [b"not an image at all", jpeg()[:40]], ids=["text", "truncated-jpeg"])
def test_unreadable_image_is_an_error_or_with_skip_a_missing_image(
    tmp_path: Path, error_of: Callable[..., str], content: bytes
) -> None:
    write_images(tmp_path / "images", ITEMS5)
    (tmp_path / "images" / "I2.jpg").write_bytes(content)
    message = error_of(prepare, tmp_path, block(USERS5, ITEMS5))
    assert "I2.jpg: unreadable image" in message and "--skip-bad-images" in message

    stats = prepare(tmp_path, block(USERS5, ITEMS5), skip_bad_images=True)
    assert (stats["items_without_image"], stats["images_unreadable"]) == (1, 1)
    assert (tmp_path / "out" / "missing_images.txt").read_text() == "I2\n"


def test_output_is_replaced_only_with_overwrite(tmp_path: Path, error_of: Callable[..., str]) -> None:
    prepare(tmp_path, block(USERS5, ITEMS5))
    assert "output exists; pass --overwrite" in error_of(prepare, tmp_path, block(USERS5, ITEMS5))
    stats = prepare(tmp_path, block([*USERS5, "U5"], ITEMS5)[:-1], overwrite=True)  # U5 falls below 5
    assert (stats["interactions"], stats["dropped"]["users_below_5_core"]) == (25, 1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_nothing_left_after_5_core_is_an_error(tmp_path: Path, error_of: Callable[..., str]) -> None:
    message = error_of(prepare, tmp_path, block(USERS5[:4], ITEMS5))
    assert "nothing is left after 5-core filtering" in message
