from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perpeft.engine.data.formats import check_image, load_recbole
from perpeft.engine.errors import InputError

ITEMS = "item_id:token\tprice:float\ttitle:token_seq\nA\t1.0\tRed Ball\nB\t2.0\tBlue Car\nC\t3.0\tGreen Kite\n"
INTERACTIONS = (
    "timestamp:float\tuser_id:token\titem_id:token\n"
    "30\tu2\tC\n"
    "20\tu1\tB\n"
    "10\tu1\tA\n"
    "20\tu1\tC\n"  # same time as the B above: stays after it
    "5\tu2\tA\n"
    "40\tu1\tB\n"  # a repeated (user, item): kept
)


def write_image(path: Path) -> None:
    Image.new("RGB", (4, 3), (200, 10, 10)).save(path)


def make_dataset(root: Path, items: str = ITEMS, interactions: str = INTERACTIONS) -> Path:
    directory = root / "toy"
    (directory / "images").mkdir(parents=True)
    (directory / "toy.item").write_text(items)
    (directory / "toy.inter").write_text(interactions)
    for name in ("A.jpg", "A.png", "B.png", "C.jpg"):
        write_image(directory / "images" / name)
    return directory


def load_error(directory: Path) -> str:
    with pytest.raises(InputError) as caught:
        load_recbole(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_loads_indices_order_titles_and_images(tmp_path: Path) -> None:
    directory = make_dataset(tmp_path)
    dataset = load_recbole(directory)
    assert dataset.name == "toy"
    assert dataset.root == directory
    assert dataset.item_ids == [None, "A", "B", "C"]
    assert dataset.titles == ["", "Red Ball", "Blue Car", "Green Kite"]
    images = directory / "images"
    assert dataset.image_paths == [None, images / "A.jpg", images / "B.png", images / "C.jpg"]
    assert dataset.user_ids == [None, "u2", "u1"]
    assert [sequence.tolist() for sequence in dataset.sequences] == [[], [1, 3], [1, 2, 3, 2]]
    assert all(sequence.dtype == np.int64 for sequence in dataset.sequences)
    assert (dataset.num_users, dataset.num_items) == (2, 3)


def test_tolerates_crlf_trailing_blank_line_and_utf8_bom(tmp_path: Path) -> None:
    directory = make_dataset(tmp_path)
    (directory / "toy.inter").write_bytes(b"\xef\xbb\xbf" + INTERACTIONS.replace("\n", "\r\n").encode() + b"\r\n")
    assert [sequence.tolist() for sequence in load_recbole(directory).sequences] == [[], [1, 3], [1, 2, 3, 2]]


def test_missing_directory(tmp_path: Path) -> None:
    assert "nowhere" in load_error(tmp_path / "nowhere")


@pytest.mark.parametrize("suffix", [".inter", ".item"])
def test_missing_file(tmp_path: Path, suffix: str) -> None:
    directory = make_dataset(tmp_path)
    (directory / f"toy{suffix}").unlink()
    message = load_error(directory)
    assert f"toy{suffix}" in message and "not found" in message


@pytest.mark.parametrize(
    ("items", "interactions", "file", "expected"),
    [
        ("item_id:token\tname:token\nA\tx\n", INTERACTIONS, "toy.item", "no 'title' column"),
        ("item_id:token\tname\nA\tx\n", INTERACTIONS, "toy.item", "column 'name' is not NAME:TYPE"),
        ("item_id:token\ttitle:words\nA\tx\n", INTERACTIONS, "toy.item", "column 'title:words' is not NAME:TYPE"),
        (ITEMS, "user_id:token\titem_id:token\n", "toy.inter", "timestamp:float"),
        (ITEMS, "user:token\titem:token\ttime:float\nu\tA\t1\n", "toy.inter", "user_id:token, item_id:token"),
        (ITEMS, "user_id:token\titem_id:token\ttimestamp:float\trating\n", "toy.inter", "column 'rating' is not"),
        (ITEMS, "user_id:token\titem_id:token\ttimestamp:float\tuser_id:float\n", "toy.inter", "repeats column"),
        (ITEMS, "", "toy.inter", "empty"),
    ],
)
def test_bad_header(tmp_path: Path, items: str, interactions: str, file: str, expected: str) -> None:
    message = load_error(make_dataset(tmp_path, items, interactions))
    assert file in message and expected in message


@pytest.mark.parametrize(
    ("items", "interactions", "file", "line", "expected"),
    [
        (ITEMS, INTERACTIONS + "u3\tA\n", "toy.inter", 8, "expected 3 tab-separated fields, found 2"),
        (ITEMS + "D\t4.0\n", INTERACTIONS, "toy.item", 5, "expected 3 tab-separated fields, found 2"),
        (ITEMS, INTERACTIONS + "yesterday\tu3\tA\n", "toy.inter", 8, "'yesterday' is not a finite number"),
        (ITEMS, INTERACTIONS + "nan\tu3\tA\n", "toy.inter", 8, "'nan' is not a finite number"),
        (ITEMS, INTERACTIONS + "50\tu3\tZ\n", "toy.inter", 8, "'Z' is not in the item file"),
        (ITEMS + "B\t9.0\tAgain\n", INTERACTIONS, "toy.item", 5, "duplicate item id 'B' (first on line 3)"),
    ],
)
def test_bad_line(tmp_path: Path, items: str, interactions: str, file: str, line: int, expected: str) -> None:
    message = load_error(make_dataset(tmp_path, items, interactions))
    assert file in message and f"line {line}:" in message and expected in message


def test_empty_interaction_file(tmp_path: Path) -> None:
    message = load_error(make_dataset(tmp_path, interactions="user_id:token\titem_id:token\ttimestamp:float\n\n"))
    assert "toy.inter" in message and "no interactions" in message


def test_item_file_without_items(tmp_path: Path) -> None:
    message = load_error(make_dataset(tmp_path, items="item_id:token\ttitle:token_seq\n"))
    assert "toy.item" in message and "no items" in message


def test_missing_image(tmp_path: Path) -> None:
    directory = make_dataset(tmp_path)
    (directory / "images" / "B.png").unlink()
    message = load_error(directory)
    assert "B.jpg" in message and "'B'" in message


def remove_images(directory: Path) -> None:
    for image in (directory / "images").iterdir():
        image.unlink()
    (directory / "images").rmdir()


def test_a_dataset_without_an_image_directory_is_a_catalog_without_images(tmp_path: Path) -> None:
    directory = make_dataset(tmp_path)
    remove_images(directory)
    dataset = load_recbole(directory)
    assert dataset.image_paths == [None] * 4
    assert (dataset.has_images, dataset.has_text) == (False, True)


def test_missing_image_directory_with_some_images_declared_missing(tmp_path: Path) -> None:
    directory = make_dataset(tmp_path)
    remove_images(directory)
    (directory / "missing_images.txt").write_text("A\n")
    message = load_error(directory)
    assert "images" in message and "only some items" in message


def test_an_item_file_of_ids_only_is_a_catalog_without_text(tmp_path: Path) -> None:
    dataset = load_recbole(make_dataset(tmp_path, items="item_id:token\nA\nB\nC\n"))
    assert dataset.titles == ["", "", "", ""]
    assert (dataset.has_images, dataset.has_text) == (True, False)


MOVIES = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\trating:float\n"
    "A\tRed Ball\t1995\tAnimation Comedy\t1.5\n"
    "B\tBlue Car\t1996\t\t2.0\n"
    "C\t\t1997\tDrama\t3.0\n"
)


def test_text_fields_pick_and_join_columns_by_name_or_name_and_type(tmp_path: Path) -> None:
    directory = make_dataset(tmp_path, items=MOVIES)
    joined = ["", "Red Ball. Animation Comedy", "Blue Car", "Drama"]
    assert load_recbole(directory, ("movie_title", "class")).titles == joined
    assert load_recbole(directory, ("movie_title:token_seq", "class:token_seq")).titles == joined
    assert load_recbole(directory, ("release_year",)).titles == ["", "1995", "1996", "1997"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (None, "no 'title' column for the item text; choose it with --text-fields (item columns: movie_title:"),
        (("title",), "--text-fields: no column 'title' (item columns: movie_title:token_seq, release_year:token"),
        (("class:token",), "--text-fields: no column 'class:token'"),
        (("rating",), "--text-fields: column 'rating:float' is not a text column"),
        (("item_id",), "--text-fields: column 'item_id:token' is not a text column"),
    ],
)
def test_text_field_errors_name_the_columns_that_exist(
    tmp_path: Path, fields: tuple[str, ...] | None, expected: str
) -> None:
    with pytest.raises(InputError) as caught:
        load_recbole(make_dataset(tmp_path, items=MOVIES), fields)
    assert "toy.item" in str(caught.value) and expected in str(caught.value) and "\n" not in str(caught.value)


def test_extra_interaction_columns_are_ignored(tmp_path: Path) -> None:
    rated = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tB\t4\t20\nu1\tA\t5\t10\n"
    assert [sequence.tolist() for sequence in load_recbole(make_dataset(tmp_path, interactions=rated)).sequences] == [
        [],
        [1, 2],
    ]


def test_check_image_accepts_a_good_image_and_names_a_bad_one(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    write_image(good)
    check_image(good)
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(noisy.read_bytes()[: noisy.stat().st_size // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    for bad in (truncated, garbage, tmp_path / "absent.png"):
        with pytest.raises(InputError) as caught:
            check_image(bad)
        assert bad.name in str(caught.value) and "\n" not in str(caught.value)


def test_a_large_interaction_file_orders_each_users_items_by_time(tmp_path: Path) -> None:
    """(Its speed at 250,000 interactions: benchmarks/test_data_bench.py.)"""
    items = 200
    rng = np.random.default_rng(0)
    users = rng.integers(0, 2_500, size=25_000)
    item_column = rng.integers(0, items, size=25_000)
    stamps = rng.integers(0, 10**12, size=25_000)
    lines = [f"u{user}\ti{item}\t{stamp}" for user, item, stamp in zip(users, item_column, stamps, strict=True)]
    directory = make_dataset(
        tmp_path,
        items="item_id:token\ttitle:token_seq\n" + "".join(f"i{item}\tTitle {item}\n" for item in range(items)),
        interactions="user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(lines) + "\n",
    )
    for item in range(items):
        (directory / "images" / f"i{item}.jpg").touch()
    dataset = load_recbole(directory)
    assert sum(map(len, dataset.sequences)) == 25_000
    for user in np.unique(users)[:50]:
        own = np.flatnonzero(users == user)
        expected = [
            dataset.item_ids.index(f"i{item}") for item in item_column[own][np.argsort(stamps[own], kind="stable")]
        ]
        assert dataset.sequences[dataset.user_ids.index(f"u{user}")].tolist() == expected
