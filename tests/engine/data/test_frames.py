"""In-memory tables as a dataset (`prepare_frames`, `perpeft.dataset_from_frames`): the same dataset as the
equivalent RecBole files, every kind of bad input as one line, and the preparers of the public API."""

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from perpeft import dataset_from_frames, fetch_images, train
from perpeft.engine.data.frames import prepare_frames
from perpeft.engine.data.sources import load_dataset

# Rows out of time order; user 7 buys B twice (kept) and A and C at the same time (row order kept); item D
# is in no interaction (left out), item C has no image, item A no brand.
INTERACTIONS = pd.DataFrame(
    {
        "user_id": [7, "u2", 7, 7, "u2", 7, "u2"],
        "item_id": ["B", "A", "C", "A", "E", "B", "B"],
        "timestamp": [30, 20, 10, 10, 5, 40, 20],
    }
)
ITEMS = pd.DataFrame(
    {
        "item_id": ["A", "B", "C", "D", "E"],
        "title": ["Red\tpaint  set", "Brush", None, "Unsold", "Easel"],
        "brand": [None, "Acme", "Acme", "Acme", "Ink & Co"],
    }
)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    directory = tmp_path / "pictures"
    directory.mkdir()
    for k, item in enumerate("ABDE"):
        (directory / f"{item}.jpg").write_bytes(jpeg((40 * k, 90, 30)))
    return directory


def recbole_files(directory: Path, images: Path) -> Path:
    """The same data written by hand as RecBole files: rows in table order, D left out."""
    directory.mkdir()
    (directory / f"{directory.name}.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in zip(*(INTERACTIONS[c] for c in INTERACTIONS), strict=True))
    )
    (directory / f"{directory.name}.item").write_text(
        "item_id:token\ttitle:token_seq\tbrand:token_seq\nA\tRed paint set\t\nB\tBrush\tAcme\nC\t\tAcme\n"
        "E\tEasel\tInk & Co\n"
    )
    (directory / "images").mkdir()
    for item in "ABE":
        (directory / "images" / f"{item}.jpg").write_bytes((images / f"{item}.jpg").read_bytes())
    (directory / "missing_images.txt").write_text("C\n")
    return directory


def test_tables_read_back_as_the_equivalent_recbole_files(tmp_path: Path, images: Path) -> None:
    stats = prepare_frames(INTERACTIONS, ITEMS, tmp_path / "shop", images, text_cols=("title", "brand"))
    dataset = load_dataset(str(tmp_path / "shop"))
    by_hand = load_dataset(str(recbole_files(tmp_path / "hand", images)), text_fields=("title", "brand"))

    assert dataset.item_ids == by_hand.item_ids == [None, "A", "B", "C", "E"]
    assert dataset.user_ids == by_hand.user_ids == [None, "7", "u2"]
    assert [s.tolist() for s in dataset.sequences] == [s.tolist() for s in by_hand.sequences]
    assert [s.tolist() for s in dataset.sequences[1:]] == [[3, 1, 2, 2], [4, 1, 2]]  # C, A, B, B; E, A, B
    assert dataset.titles == by_hand.titles == ["", "Red paint set", "Brush. Acme", "Acme", "Easel. Ink & Co"]
    names = [None if path is None else path.name for path in dataset.image_paths]
    assert names == [None if path is None else path.name for path in by_hand.image_paths]
    assert names == [None, "A.jpg", "B.jpg", None, "E.jpg"]
    assert (tmp_path / "shop" / "missing_images.txt").read_text() == "C\n"
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 4, 7)
    assert stats["dropped"] == {"items_unreferenced": 1} and stats["items_without_image"] == 1
    assert json.loads((tmp_path / "shop" / "stats.json").read_text()) == stats


def test_integer_ids_float_times_and_no_images(tmp_path: Path) -> None:
    interactions = pd.DataFrame({"uid": [1, 1, 2], "iid": [10, 11, 10], "t": [0.5, 0.25, 1e9]})
    items = pd.DataFrame({"iid": [11, 10], "name": ["b", "a"]})
    prepare_frames(interactions, items, tmp_path / "ints", None, "uid", "iid", "t", ("name",))
    dataset = load_dataset(str(tmp_path / "ints"))
    assert (dataset.item_ids, dataset.titles, dataset.has_images) == ([None, "11", "10"], ["", "b", "a"], False)
    assert [s.tolist() for s in dataset.sequences[1:]] == [[1, 2], [2]]


def frame(**columns: list) -> pd.DataFrame:
    return pd.DataFrame(columns)


def interactions_with(**changes: list) -> pd.DataFrame:
    return frame(**{**{"user_id": ["u1", "u1"], "item_id": ["A", "B"], "timestamp": [1, 2]}, **changes})


ITEMS_AB = frame(item_id=["A", "B"], title=["a", "b"])
BAD_INPUTS = {
    "missing column": (
        interactions_with().drop(columns="timestamp"),
        ITEMS_AB,
        "interactions: no column 'timestamp' (columns: user_id, item_id)",
    ),
    "missing text column": (interactions_with(), frame(item_id=["A", "B"]), "items: no column 'title'"),
    "duplicate item": (
        interactions_with(),
        frame(item_id=["A", "B", "A"], title=["a", "b", "c"]),
        "items: row 2: duplicate item_id 'A' (first on row 0)",
    ),
    "unknown item": (
        interactions_with(item_id=["A", "Z"]),
        ITEMS_AB,
        "interactions: row 1: item_id 'Z' is not in the items table",
    ),
    "text time": (
        interactions_with(timestamp=["2021-01-01", "2021-01-02"]),
        ITEMS_AB,
        "interactions: row 0: timestamp '2021-01-01' is not a number",
    ),
    "datetime time": (
        interactions_with(timestamp=pd.to_datetime(["2021-01-01", "2021-01-02"])),
        ITEMS_AB,
        "interactions: column 'timestamp' holds datetime64",
    ),
    "missing time": (
        interactions_with(timestamp=[1.0, None]),
        ITEMS_AB,
        "interactions: row 1: timestamp nan is not a finite number",
    ),
    "empty interactions": (interactions_with(user_id=[], item_id=[], timestamp=[]), ITEMS_AB, "interactions: no rows"),
    "empty items": (interactions_with(), frame(item_id=[], title=[]), "items: no rows"),
    "missing user": (interactions_with(user_id=["u1", None]), ITEMS_AB, "interactions: row 1: user_id is missing"),
    "float id": (interactions_with(user_id=[1.5, 2.5]), ITEMS_AB, "interactions: row 0: user_id 1.5 is not a string"),
    "path in id": (
        interactions_with(),
        frame(item_id=["A", "../B"], title=["a", "b"]),
        "items: row 1: item_id '../B' has a leading dot, whitespace, a path separator",
    ),
    "number as title": (interactions_with(), frame(item_id=["A", "B"], title=["a", 5]), "items: row 1: title 5 is a"),
}


@pytest.mark.parametrize("interactions, items, expected", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_tables_are_one_line_naming_table_column_and_row(
    tmp_path: Path, error_of: Callable[..., str], interactions: pd.DataFrame, items: pd.DataFrame, expected: str
) -> None:
    assert expected in error_of(prepare_frames, interactions, items, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_image_directory_and_unreadable_image(tmp_path: Path, error_of: Callable[..., str], images: Path) -> None:
    message = error_of(prepare_frames, INTERACTIONS, ITEMS, tmp_path / "out", tmp_path / "nowhere")
    assert message.startswith(f"{tmp_path / 'nowhere'}: image directory not found")
    (images / "A.jpg").write_bytes(b"not a jpeg")
    assert "A.jpg: unreadable image" in error_of(prepare_frames, INTERACTIONS, ITEMS, tmp_path / "out", images)
    stats = prepare_frames(INTERACTIONS, ITEMS, tmp_path / "out", images, skip_bad_images=True)
    assert (stats["images_unreadable"], stats["items_without_image"]) == (1, 2)


def test_existing_output_is_refused_without_overwrite(tmp_path: Path, error_of: Callable[..., str]) -> None:
    prepare_frames(INTERACTIONS, ITEMS, tmp_path / "shop")
    message = error_of(prepare_frames, INTERACTIONS.iloc[:3], ITEMS, tmp_path / "shop")
    assert message == f"{tmp_path / 'shop'}: output exists; pass --overwrite to replace it"
    prepare_frames(INTERACTIONS.iloc[:3], ITEMS, tmp_path / "shop", overwrite=True)
    assert sum(map(len, load_dataset(str(tmp_path / "shop")).sequences)) == 3


def test_without_pandas_the_hint_says_which_extra(
    tmp_path: Path, error_of: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    message = error_of(prepare_frames, INTERACTIONS, ITEMS, tmp_path / "out")
    assert message.endswith("pip install 'perpeft-engine[pandas]'")


# --- the public API -----------------------------------------------------------------------------------------


def test_a_frames_dataset_trains_through_the_api(tmp_path: Path, small_config) -> None:
    rng = np.random.default_rng(0)
    users = np.repeat([f"user{k}" for k in range(24)], 6)
    items = pd.DataFrame({"sku": np.arange(100, 130), "title": [f"item {k} red golf" for k in range(30)]})
    interactions = pd.DataFrame(
        {"user": users, "sku": rng.choice(items["sku"], size=len(users)), "time": rng.permutation(len(users))}
    )
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for k, sku in enumerate(items["sku"]):
        (pictures / f"{sku}.jpg").write_bytes(jpeg((8 * k, 100, 200 - 5 * k)))

    path = dataset_from_frames(
        interactions, items, tmp_path / "golf", pictures, user_col="user", item_col="sku", time_col="time"
    )
    assert path == tmp_path / "golf"
    run = train(small_config(path), tmp_path / "run", progress=False)
    assert run.metrics["dataset"] == "golf"


def test_fetch_images_takes_item_ids_and_reports_where(tmp_path: Path) -> None:
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps({"parent_asin": item, "images": []}) + "\n" for item in ("A1", "A2")))
    fetched = fetch_images(meta, tmp_path / "img", items=["A2", "A9"])
    assert (fetched.path, fetched.report, fetched.missing_images) == (
        tmp_path / "img",
        tmp_path / "img" / "fetch_report.json",
        None,
    )
    assert (fetched.stats["items_without_url"], fetched.stats["items_not_in_meta"]) == (["A2"], ["A9"])
    assert json.loads(fetched.report.read_text()) == fetched.stats
