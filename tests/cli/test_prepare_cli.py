"""`perpeft-engine prepare authors|amazon2023` and `fetch-images`: wiring, output, and one-line errors."""

import gzip
import io
import json
import pickle
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from perpeft.cli.prepare import fetch_images, prepare
from perpeft.engine.data.sources import load_dataset

# The commands as cli/main.py registers them.
CLI = click.Group(commands=[prepare, fetch_images])
USERS = [f"U{k}" for k in range(6)]
ITEMS = [f"I{k}" for k in range(5)]


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def run(*args: str | Path):
    return CliRunner().invoke(CLI, [str(arg) for arg in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    return result.output


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Path]:
    """Amazon-2023-style files: 6 users x 5 items, one user's lines duplicated, one item without image."""
    reviews = [{"user_id": u, "parent_asin": i, "timestamp": 1000 * k} for u in USERS for k, i in enumerate(ITEMS)]
    reviews.append(dict(reviews[0], timestamp=99_000))
    with gzip.open(tmp_path / "reviews.jsonl.gz", "wt") as stream:
        stream.writelines(json.dumps(r) + "\n" for r in reviews)
    meta = [{"parent_asin": i, "title": f"Item {i}", "images": []} for i in ITEMS]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    (tmp_path / "images").mkdir()
    for item in ITEMS[1:]:
        (tmp_path / "images" / f"{item}.jpg").write_bytes(jpeg())
    return {"reviews": tmp_path / "reviews.jsonl.gz", "meta": tmp_path / "meta.jsonl", "images": tmp_path / "images"}


def amazon_args(raw: dict[str, Path], out: Path, *extra: str) -> list:
    options = ["--reviews", raw["reviews"], "--meta", raw["meta"], "--images", raw["images"], "--out", out]
    return ["prepare", "amazon2023", *options, "--user-fraction", "1", "--quiet", *extra]


def test_prepare_amazon2023_prints_table_1_and_writes_stats(raw: dict[str, Path], tmp_path: Path) -> None:
    result = run(*amazon_args(raw, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "# Users   # Items  Avg. Seq. Len.   Density" in result.output
    assert "         6         5          5.0000    1.0000" in result.output
    assert "reviews_duplicate 1" in result.output and "missing_images.txt" in result.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["items_without_image"]) == (6, 5, 1)

    again = run(*amazon_args(raw, tmp_path / "out"))
    assert "output exists; pass --overwrite" in one_line_error(again)
    assert run(*amazon_args(raw, tmp_path / "out", "--overwrite")).exit_code == 0


def test_prepare_amazon2023_bad_line_is_one_line_exit_2(raw: dict[str, Path], tmp_path: Path) -> None:
    with raw["meta"].open("a") as stream:
        stream.write("{not json\n")
    message = one_line_error(run(*amazon_args(raw, tmp_path / "out")))
    assert f"{raw['meta']}: line 6: not valid JSON" in message
    assert run(*amazon_args(raw, tmp_path / "out", "--skip-bad-lines")).exit_code == 0


def test_prepare_amazon2023_rejects_a_fraction_out_of_range(raw: dict[str, Path], tmp_path: Path) -> None:
    result = run(*amazon_args(raw, tmp_path / "out"), "--user-fraction", "0")
    assert result.exit_code == 2 and "0.0<x<=1.0" in result.output


def test_prepare_authors_defaults_to_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "released"
    (src / "beauty_care_images").mkdir(parents=True)
    (src / "beauty_care_final.txt").write_text("".join(f"{u} {i}\n" for u in (1, 2) for i in (1, 2, 3)))
    (src / "beauty_care_item2id_final.pickle").write_bytes(pickle.dumps({1: "A1", 2: "A2", 3: "A3"}))
    (src / "beauty_care_texts_final.pickle").write_bytes(pickle.dumps({"A1": "Soap", "A2": "Comb", "A3": "Gel"}))
    for key in ("A1", "A2", "A3"):
        (src / "beauty_care_images" / f"{key}.jpg").write_bytes(jpeg())
    monkeypatch.setenv("PERPEFT_DATA", str(tmp_path / "data"))

    result = run("prepare", "authors", "--src", src, "--name", "beauty", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"written: {tmp_path / 'data' / 'beauty'}" in result.output
    assert load_dataset("beauty").titles == ["", "Soap", "Comb", "Gel"]

    (src / "beauty_care_texts_final.pickle").write_bytes(pickle.dumps({"A1": Path("x")}))
    message = one_line_error(run("prepare", "authors", "--src", src, "--name", "beauty", "--overwrite", "--quiet"))
    assert "beauty_care_texts_final.pickle: refused pickle" in message


def test_fetch_images_reports_without_network(tmp_path: Path) -> None:
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"parent_asin": "A1", "images": [{"large": "x", "variant": "PT01"}]}) + "\n")
    (tmp_path / "want.txt").write_text("A1\nA9\n\n")
    result = run("fetch-images", "--meta", meta, "--out", tmp_path / "img", "--items", tmp_path / "want.txt", "--quiet")
    assert result.exit_code == 0, result.output
    assert "without MAIN image URL 1, not in meta 1" in result.output
    report = json.loads((tmp_path / "img" / "fetch_report.json").read_text())
    assert (report["items_without_url"], report["items_not_in_meta"]) == (["A1"], ["A9"])

    meta.write_text("[]\n")
    assert f"{meta}: line 1: a JSON list, not an object" in one_line_error(
        run("fetch-images", "--meta", meta, "--out", tmp_path / "img", "--quiet")
    )


def test_prepare_authors_finds_a_release_under_any_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "released"
    src.mkdir()
    (src / "garden_final.txt").write_text("".join(f"{u} {i}\n" for u in (1, 2) for i in (1, 2, 3)))
    (src / "garden_item2id_final.pickle").write_bytes(pickle.dumps({1: "G1", 2: "G2", 3: "G3"}))
    (src / "garden_texts_final.pickle").write_bytes(pickle.dumps({"G1": "Hose", "G2": "Rake", "G3": "Seeds"}))
    monkeypatch.setenv("PERPEFT_DATA", str(tmp_path / "data"))

    result = run("prepare", "authors", "--src", src, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"written: {tmp_path / 'data' / 'garden'}" in result.output
    assert "a catalog without images, which trains on text only" in result.output
    dataset = load_dataset(str(tmp_path / "data" / "garden"))
    assert (dataset.titles, dataset.has_images) == (["", "Hose", "Rake", "Seeds"], False)

    (src / "pond_final.txt").write_text("1 1\n")
    (src / "pond_item2id_final.pickle").write_bytes(pickle.dumps({1: "P1"}))
    assert "holds the releases garden, pond; choose one with --name" in one_line_error(
        run("prepare", "authors", "--src", src, "--quiet")
    )
