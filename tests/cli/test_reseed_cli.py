"""`perpeft-engine train --global-from RUN --seed N`: the second stage again, with RUN's Global stage and groups."""

import json

from click.testing import CliRunner

from perpeft.cli.main import cli


def train(*args: str):
    return CliRunner().invoke(cli, ["train", "--quiet", *args])


def test_reseeded_run_prints_where_its_global_stage_comes_from(demo_run, tmp_path):
    result = train("--global-from", str(demo_run), "--seed", "4", "--device", "cpu", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    assert "seed 4 (Global stage and groups of seed 0)" in result.stdout.splitlines()[0]
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["seed"], config["global_seed"], config["device"]) == (4, 0, "cpu")
    default = train("--global-from", str(demo_run), "--seed", "6")
    assert default.exit_code == 0, default.output
    assert (demo_run.parent / f"{demo_run.name}-reseed-6" / "metrics.json").is_file()


def test_reseeding_input_errors(demo_run, tmp_path, assert_one_line_error):
    out = str(tmp_path / "r")
    assert_one_line_error(
        train("--global-from", str(demo_run), "--seed", "2", "--peft", "ia3", "--no-text", "--out", out),
        "takes every setting from that run's config.json; drop --peft, --no-text",
    )
    assert_one_line_error(train("--global-from", str(demo_run), "--out", out), "--global-from needs --seed")
    assert_one_line_error(train("--global-from", str(demo_run), "--seed", "0", "--out", out), "pick another")
    assert_one_line_error(
        train("--global-from", str(demo_run), "--seed", "2", "--resume", str(demo_run)), "--resume and --global-from"
    )
    assert_one_line_error(train("--global-from", str(tmp_path / "nowhere"), "--seed", "2"), "not a run directory")
    assert not (tmp_path / "r").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert_one_line_error(
        train("--global-from", str(demo_run), "--seed", "2", "--out", str(tmp_path / "taken")), "--overwrite"
    )
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
