"""Bad input to `perpeft-engine train`: one line naming the file, exit status 2, nothing overwritten."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from perpeft.cli.main import cli

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"
ITEM_HEADER = "item_id:token\ttitle:token_seq"


def write_dataset(root: Path, inter: list[str], items: list[str], images: dict[str, bytes | None]) -> Path:
    directory = root / "shop"
    (directory / "images").mkdir(parents=True)
    (directory / "shop.inter").write_text("\n".join(inter) + "\n")
    (directory / "shop.item").write_text("\n".join(items) + "\n")
    for item, content in images.items():
        path = directory / "images" / f"{item}.png"
        if content is None:
            Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
        else:
            path.write_bytes(content)
    return directory


def good_parts() -> tuple[list[str], list[str], dict[str, bytes | None]]:
    inter = [INTER_HEADER] + [f"u{u}\ti{k}\t{u * 10 + k}" for u in range(3) for k in range(1, 5)]
    items = [ITEM_HEADER] + [f"i{k}\tred golf bag {k}" for k in range(1, 5)]
    return inter, items, {f"i{k}": None for k in range(1, 5)}


def run_train(*args: str):
    return CliRunner().invoke(cli, ["train", "--quiet", "--clip", "tiny", *args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_dataset_path(tmp_path):
    assert_one_line_error(run_train("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")), "nowhere")
    assert not (tmp_path / "run").exists()


def test_header_missing_column(tmp_path):
    inter, items, images = good_parts()
    inter[0] = "user_id:token\titem_id:token"
    data = write_dataset(tmp_path, inter, items, images)
    assert_one_line_error(run_train("--data", str(data), "--out", str(tmp_path / "run")), "shop.inter", "timestamp")


def test_non_numeric_timestamp_names_line(tmp_path):
    inter, items, images = good_parts()
    inter[3] = "u0\ti3\tyesterday"
    data = write_dataset(tmp_path, inter, items, images)
    assert_one_line_error(run_train("--data", str(data), "--out", str(tmp_path / "run")), "shop.inter", "4")


def test_interaction_with_unknown_item(tmp_path):
    inter, items, images = good_parts()
    inter.append("u2\ti99\t500")
    data = write_dataset(tmp_path, inter, items, images)
    assert_one_line_error(run_train("--data", str(data), "--out", str(tmp_path / "run")), "shop.inter", "i99")


def test_unreadable_image(tmp_path):
    inter, items, images = good_parts()
    images["i2"] = b"not an image at all"
    data = write_dataset(tmp_path, inter, items, images)
    assert_one_line_error(run_train("--data", str(data), "--out", str(tmp_path / "run")), "i2.png")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [[], ["--resume"]])
def test_existing_run_is_never_overwritten(tmp_path, option):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"keep": true}')
    args = ["--resume", str(run)] if option else ["--out", str(run)]
    result = run_train(*args)
    assert result.exit_code == 2
    assert (run / "metrics.json").read_text() == '{"keep": true}'


def text_only_dataset(root: Path, item_header: str = "item_id:token\tmovie_title:token_seq\tclass:token_seq") -> Path:
    """A RecBole-style catalog without images: an extra rating column, two text columns, no images/."""
    directory = root / "movies"
    directory.mkdir()
    ratings = [f"u{u}\ti{(u * k) % 5 + 1}\t{(u + k) % 5}\t{u * 10 + k}" for u in range(8) for k in range(1, 6)]
    (directory / "movies.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    with (directory / "movies.inter").open("a") as stream:
        stream.write("\n".join(ratings) + "\n")
    rows = [f"i{k}\tfilm {k}\tdrama comedy" for k in range(1, 6)]
    (directory / "movies.item").write_text(item_header + "\n" + "\n".join(rows) + "\n")
    return directory


def test_unknown_text_field_names_the_columns(tmp_path):
    data = text_only_dataset(tmp_path)
    result = run_train("--data", str(data), "--text-fields", "movie_title,genre", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "movies.item", "--text-fields: no column 'genre'", "movie_title:token_seq")
    assert not (tmp_path / "run").exists()
    assert_one_line_error(
        run_train("--data", str(data), "--out", str(tmp_path / "run")), "choose it with --text-fields"
    )


def test_images_asked_of_a_catalog_without_images(tmp_path):
    data = text_only_dataset(tmp_path)
    args = ("--data", str(data), "--text-fields", "movie_title", "--out", str(tmp_path / "run"))
    assert_one_line_error(run_train(*args, "--image"), str(data), "the catalog has no images", "drop --image")
    assert_one_line_error(run_train(*args, "--no-text"), "the catalog has no images and --no-text drops")
    assert_one_line_error(run_train(*args, "--peft", "iisan"), "IISAN's inter-modal chain needs both")
    assert not (tmp_path / "run").exists()


def test_malformed_extra_column(tmp_path):
    data = text_only_dataset(tmp_path, item_header="item_id:token\tmovie_title:token_seq\tclass")
    result = run_train("--data", str(data), "--text-fields", "movie_title", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "movies.item", "line 1: column 'class' is not NAME:TYPE")


def test_a_catalog_without_images_trains_on_text_with_every_training_window(tmp_path, assert_learned):
    data = text_only_dataset(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "train", "--quiet", "--clip", "tiny", "--data", str(data), "--text-fields", "movie_title,class",
            "--train-windows", "all", "--groups", "2", "--epochs-global", "1", "--epochs-perpeft", "1",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["text"], config["image"], config["train_windows"]) == (True, False, "all")
    assert config["text_fields"] == "movie_title,class"
    assert_learned(out, beats_chance=False)  # 5 items: a random ranking's top 10 holds every target
