"""Road 1 (the authors' released files), the restricted unpickler, and named datasets."""

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perpeft.engine.data.authors import default_output_name, detect_prefix, prepare_authors
from perpeft.engine.data.formats import load_recbole
from perpeft.engine.data.safe_pickle import load_plain_pickle
from perpeft.engine.data.sources import load_dataset
from perpeft.engine.train.pipeline import train_new_run

KEYS = {1: "B0A", 2: "B0B", 3: "B0C", 4: "B0D", 5: "B0E", 6: "B0F", 7: "UNUSED"}
TITLES = {"B0A": "Red\tpaint set", "B0B": "Brush", "B0C": None, "B0D": "Easel", "B0E": "Canvas", "B0F": "Ink"}
# Users interleaved; each user's lines in purchase order (user 3 buys item 2 twice: kept, as released).
FINAL = "1 3\n2 1\n1 1\n3 2\n2 4\n1 6\n3 5\n3 2\n\n2 3\n"
SEQUENCES = {"1": [3, 1, 6], "2": [1, 4, 3], "3": [2, 5, 2]}


class Payload:
    """Not plain data: unpickling it needs a class lookup."""


class RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def authors_dir(root: Path, prefix: str = "arts", final: str = FINAL, keys: object = KEYS) -> Path:
    src = root / "released"
    (src / f"{prefix}_images").mkdir(parents=True)
    (src / f"{prefix}_final.txt").write_text(final)
    (src / f"{prefix}_item2id_final.pickle").write_bytes(pickle.dumps(keys))
    (src / f"{prefix}_texts_final.pickle").write_bytes(pickle.dumps(TITLES))
    for k, key in enumerate(["B0A", "B0B", "B0C", "B0D", "B0E", "B0F"]):
        (src / f"{prefix}_images" / f"{key}.jpg").write_bytes(jpeg((40 * k, 20, 20)))
    return src


def test_converted_files_load_with_the_same_sequences_titles_and_images(tmp_path: Path) -> None:
    src = authors_dir(tmp_path, prefix="sports_outdoors")
    stats = prepare_authors(src, "sports", tmp_path / "out")

    dataset = load_recbole(tmp_path / "out")
    assert dataset.item_ids == [None, "B0A", "B0B", "B0C", "B0D", "B0E", "B0F"]  # engine index = authors' index
    assert dataset.user_ids == [None, "1", "2", "3"]
    assert {dataset.user_ids[u]: dataset.sequences[u].tolist() for u in (1, 2, 3)} == SEQUENCES
    assert dataset.titles == ["", "Red paint set", "Brush", "", "Easel", "Canvas", "Ink"]
    for k in range(1, 7):
        source = src / "sports_outdoors_images" / f"{dataset.item_ids[k]}.jpg"
        assert dataset.image_paths[k].read_bytes() == source.read_bytes()
    inter = (tmp_path / "out" / "out.inter").read_text().splitlines()
    assert inter[1:4] == ["1\tB0C\t1", "2\tB0A\t2", "1\tB0A\t3"]  # timestamps: line numbers
    assert inter[-1] == "2\tB0C\t10"  # after a blank line
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 6, 9)
    assert stats["dropped"] == {"items_unreferenced": 1}
    assert (stats["items_without_title"], stats["items_without_image"]) == (1, 0)


def test_a_release_under_any_prefix_is_found_or_named(tmp_path: Path, error_of: Callable[..., str]) -> None:
    src = authors_dir(tmp_path, prefix="garden_tools")
    stats = prepare_authors(src, None, tmp_path / "found")
    assert stats["source"]["prefix"] == "garden_tools"
    assert load_recbole(tmp_path / "found").item_ids[1:] == ["B0A", "B0B", "B0C", "B0D", "B0E", "B0F"]
    assert prepare_authors(src, "garden_tools", tmp_path / "named")["items"] == 6
    assert detect_prefix(src) == "garden_tools"
    assert default_output_name("garden_tools") == "garden_tools"
    assert default_output_name("beauty_care") == "beauty"

    authors_dir(tmp_path, prefix="pet_food")
    assert "holds the releases garden_tools, pet_food; choose one with --name" in error_of(detect_prefix, src)
    assert "pets_item2id_final.pickle" in error_of(prepare_authors, src, "pets", tmp_path / "x")
    assert "no release found" in error_of(detect_prefix, tmp_path)
    assert "--name '../up' has a leading dot" in error_of(prepare_authors, src, "../up", tmp_path / "y")


def test_a_release_without_images_is_a_catalog_without_images(tmp_path: Path) -> None:
    src = authors_dir(tmp_path)
    for image in (src / "arts_images").iterdir():
        image.unlink()
    (src / "arts_images").rmdir()
    stats = prepare_authors(src, "arts", tmp_path / "out")
    assert stats["items_without_image"] == 6
    dataset = load_recbole(tmp_path / "out")
    assert (dataset.has_text, dataset.has_images) == (True, False)


def test_missing_image_is_counted_and_listed(tmp_path: Path) -> None:
    src = authors_dir(tmp_path)
    (src / "arts_images" / "B0D.jpg").unlink()
    stats = prepare_authors(src, "arts", tmp_path / "out")
    assert stats["items_without_image"] == 1
    assert (tmp_path / "out" / "missing_images.txt").read_text() == "B0D\n"


def test_unreadable_image_is_an_error_or_skipped(tmp_path: Path, error_of: Callable[..., str]) -> None:
    src = authors_dir(tmp_path)
    (src / "arts_images" / "B0B.jpg").write_bytes(b"<html>404</html>")
    assert "B0B.jpg: unreadable image" in error_of(prepare_authors, src, "arts", tmp_path / "out")
    stats = prepare_authors(src, "arts", tmp_path / "out", skip_bad_images=True)
    assert (stats["items_without_image"], stats["images_unreadable"]) == (1, 1)


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        ("1 3\n2 x\n", "arts_final.txt: line 2: expected 'user item'"),
        ("1 3\n2 3 4\n", "arts_final.txt: line 2: expected 'user item'"),
        ("1 3\n0 3\n", "arts_final.txt: line 2: expected 'user item'"),
        ("1 3\n2 9\n", "arts_final.txt: line 2: item 9 is not in the item2id pickle"),
        ("\n", "arts_final.txt: no interactions"),
    ],
)
def test_malformed_interaction_file_names_file_and_line(
    tmp_path: Path, error_of: Callable[..., str], final: str, expected: str
) -> None:
    src = authors_dir(tmp_path, final=final)
    assert expected in error_of(prepare_authors, src, "arts", tmp_path / "out")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["B0A"], "expected a dict of item index → item key, found a list"),
        ({"1": "B0A"}, "item index '1' is not a positive integer"),
        ({**KEYS, 2: "../x"}, "key of item 2 '../x' has a leading dot"),
        ({**KEYS, 2: "B0A"}, "items 1 and 2 share the key 'B0A'"),
    ],
)
def test_bad_item2id_pickle_is_refused(
    tmp_path: Path, error_of: Callable[..., str], keys: object, expected: str
) -> None:
    src = authors_dir(tmp_path, keys=keys)
    message = error_of(prepare_authors, src, "arts", tmp_path / "out")
    assert "arts_item2id_final.pickle: " in message and expected in message


# --- the restricted unpickler -----------------------------------------------------------------------------


def test_plain_values_load(tmp_path: Path) -> None:
    shared = [1, 2.5, None, True]
    value = {"a": shared, "b": (shared, "x"), 3: {"nested": [[[]]]}, "big": 2**80}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"plain{protocol}.pickle"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        assert load_plain_pickle(path) == value


@pytest.mark.parametrize(
    ("make", "protocol", "expected"),
    [
        (lambda marker: Payload(), 5, "test_authors.Payload"),
        (lambda marker: RunsCommand(marker), 0, "refers to posix.system"),
        (lambda marker: RunsCommand(marker), 5, "refers to posix.system"),
        (lambda marker: {"items": {1, 2}}, 5, "holds a set"),
        (lambda marker: [b"raw"], 5, "holds a bytes"),
        (lambda marker: {"x": bytearray(b"raw")}, 5, "holds a bytearray"),
        (lambda marker: {"items": {1, 2}}, 2, "refers to __builtin__.set"),
    ],
    ids=["class-instance", "os-system-v0", "os-system-v5", "set", "bytes", "bytearray", "set-v2"],
)
def test_non_plain_pickles_are_refused_without_running_anything(
    tmp_path: Path, error_of: Callable[..., str], make, protocol: int, expected: str
) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "arts_texts_final.pickle"
    path.write_bytes(pickle.dumps(make(marker), protocol=protocol))
    message = error_of(load_plain_pickle, path)
    assert message.startswith(f"{path}: refused pickle") and expected in message
    assert not marker.exists()


def test_refused_pickle_stops_the_conversion(tmp_path: Path, error_of: Callable[..., str]) -> None:
    src = authors_dir(tmp_path)
    (src / "arts_texts_final.pickle").write_bytes(pickle.dumps({"B0A": Payload()}))
    assert "arts_texts_final.pickle: refused pickle" in error_of(prepare_authors, src, "arts", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"not a pickle"], ids=["empty", "garbage", "text"])
def test_damaged_pickle_is_an_input_error(tmp_path: Path, error_of: Callable[..., str], content: bytes) -> None:
    path = tmp_path / "x.pickle"
    path.write_bytes(content)
    assert error_of(load_plain_pickle, path).startswith(f"{path}: refused pickle")


# --- named datasets ---------------------------------------------------------------------------------------


def test_named_dataset_absent_says_which_files_and_which_commands(tmp_path: Path, error_of: Callable[..., str]) -> None:
    message = error_of(load_dataset, "arts", tmp_path)
    assert f"{tmp_path / 'arts'}: dataset 'arts' is not prepared" in message
    assert "arts.inter, arts.item and images/ITEM_ID.jpg" in message
    assert f"prepare authors --src DIR --name arts --out {tmp_path / 'arts'}" in message
    assert "prepare amazon2023 --reviews Arts_Crafts_and_Sewing.jsonl.gz" in message
    assert "--user-fraction 0.4" in message


def test_named_dataset_loads_from_data_dir_or_perpeft_data(
    tmp_path: Path, error_of: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare_authors(authors_dir(tmp_path, prefix="toys_games"), "toys_games", tmp_path / "data" / "toys")
    assert load_dataset("toys", tmp_path / "data").num_users == 3
    monkeypatch.setenv("PERPEFT_DATA", str(tmp_path / "data"))
    assert load_dataset("toys").num_items == 6
    assert load_dataset(str(tmp_path / "data" / "toys")).num_items == 6  # a directory still works
    assert "no such dataset directory" in error_of(load_dataset, str(tmp_path / "nowhere"))


def test_authors_format_trains_end_to_end(tmp_path: Path, small_config, assert_learned) -> None:
    """The authors' release → prepare → train: the whole pipeline runs on a converted dataset."""
    keys = {k: f"B{k:03d}" for k in range(1, 31)}
    rng = np.random.default_rng(0)
    lines = [f"{user} {item}" for user in range(1, 41) for item in rng.choice(30, size=6, replace=False) + 1]
    src = tmp_path / "released"
    (src / "arts_images").mkdir(parents=True)
    (src / "arts_final.txt").write_text("\n".join(lines) + "\n")
    (src / "arts_item2id_final.pickle").write_bytes(pickle.dumps(keys))
    (src / "arts_texts_final.pickle").write_bytes(pickle.dumps({key: f"item {key} red golf" for key in keys.values()}))
    for k, key in keys.items():
        (src / "arts_images" / f"{key}.jpg").write_bytes(jpeg((8 * k, 100, 200 - 5 * k)))
    prepare_authors(src, "arts", tmp_path / "arts")

    _, metrics = train_new_run(small_config(tmp_path / "arts"), tmp_path / "run", False, lambda line: None, False)
    assert metrics["dataset"] == "arts"
    assert_learned(tmp_path / "run", beats_chance=False)  # random interactions: nothing to rank above chance
