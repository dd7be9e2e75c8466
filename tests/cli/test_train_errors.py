"""Bad input to `perpeft-engine train`: one line naming the file, exit status 2, nothing overwritten."""

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
