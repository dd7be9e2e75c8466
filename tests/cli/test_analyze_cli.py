"""`perpeft-engine analyze attention|divergence|case` on a small trained demo run."""

import json
import shutil
import sys

import pytest
from click.testing import CliRunner

from perpeft.cli.analyze import analyze
from perpeft.cli.main import cli
from perpeft.engine.runtime.run_directory import EMBEDDINGS

if analyze.name not in cli.commands:
    cli.add_command(analyze)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["analyze", *args])


def test_attention_prints_each_group_and_writes_the_heat_map(embedded_run, assert_one_line_error):
    result = invoke("attention", "--run", str(embedded_run), "--item", "i0004")
    assert result.exit_code == 0, result.output
    header, *groups, written = result.stdout.splitlines()
    assert header.startswith("item i0004: ")
    assert [line.split()[:2] for line in groups] == [["group", "0"], ["group", "1"]]
    for line in groups:
        pairs = [pair.rstrip("*").rsplit(":", 1) for pair in line.split("users)")[1].split()]
        assert [token for token, _ in pairs] == header.split(": ", 1)[1].lower().split()
        assert sum(float(weight) for _, weight in pairs) == pytest.approx(1.0, abs=5e-3)
        assert line.count("*") == 1
    png = embedded_run / "analysis" / "attention-i0004.png"
    assert written == f"heat map: {png}"
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 2000

    assert_one_line_error(invoke("attention", "--run", str(embedded_run), "--item", "i0004"), "--overwrite")
    again = invoke("attention", "--run", str(embedded_run), "--item", "i0004", "--overwrite")
    assert again.exit_code == 0, again.output
    quiet = invoke("attention", "--run", str(embedded_run), "--item", "i0005", "--no-png")
    assert quiet.exit_code == 0 and "heat map" not in quiet.stdout
    assert not (embedded_run / "analysis" / "attention-i0005.png").exists()


def test_attention_input_errors(embedded_run, tmp_path, monkeypatch, assert_one_line_error):
    assert_one_line_error(invoke("attention", "--run", str(embedded_run), "--item", "x9"), "--item", "x9")
    iisan = shutil.copytree(embedded_run, tmp_path / "iisan")
    config = json.loads((iisan / "config.json").read_text())
    (iisan / "config.json").write_text(json.dumps({**config, "peft": "iisan"}))
    assert_one_line_error(invoke("attention", "--run", str(iisan), "--item", "i0001"), str(iisan), "IISAN")
    (iisan / "metrics.json").unlink()
    assert_one_line_error(invoke("attention", "--run", str(iisan), "--item", "i0001"), "not finished")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    png = tmp_path / "map.png"
    result = invoke("attention", "--run", str(embedded_run), "--item", "i0001", "--png", str(png))
    assert_one_line_error(result, "perpeft-engine[plot]")
    assert not png.exists()


def test_divergence_table_and_json(embedded_run, assert_one_line_error):
    result = invoke("divergence", "--run", str(embedded_run), "--run2", str(embedded_run), "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "mean over 34 items, 2 groups" in lines[0]
    assert lines[1].split() == ["Intra-clus.", "0"]
    assert lines[2].startswith("Inter-clus.") and float(lines[2].split()[1]) > 0
    assert lines[3] == "groups of --run matched to --run2: 0→0, 1→1"
    assert lines[4] == "users in the matched group: 100.0%"

    as_json = json.loads(invoke("divergence", "--run", str(embedded_run), "--items", "5", "--json", "--quiet").stdout)
    assert as_json["items"] == 5 and as_json["intra"] is None and as_json["inter"] > 0
    assert as_json["matched_users"] is None
    assert_one_line_error(invoke("divergence", "--run", str(embedded_run / "nowhere")), "not a run directory")


def test_case_prints_columns_and_writes_the_page(embedded_run, assert_one_line_error):
    result = invoke("case", "--run", str(embedded_run), "--user", "u00004", "--k", "3", "--quiet")
    assert result.exit_code == 0, result.output
    header, headings, rule, *rows, written = result.stdout.splitlines()
    assert header.startswith("user u00004 · group ")
    assert "history (oldest first)" in headings and "Global PEFT" in headings and "own group" in headings
    assert set(rule.replace(" ", "")) == {"-"}
    assert rows[0].split()[0] != "1." and "1. " in rows[0] and "3. " in rows[2]
    page = embedded_run / "analysis" / "case-u00004.html"
    assert written == f"page: {page}"
    assert "data:image/jpeg;base64," in page.read_text()

    assert_one_line_error(invoke("case", "--run", str(embedded_run), "--user", "u00004"), "--overwrite")
    assert_one_line_error(
        invoke("case", "--run", str(embedded_run), "--user", "nobody", "--overwrite"), "--user", "nobody"
    )
    bare = shutil.copytree(
        embedded_run, embedded_run.parent / "bare", ignore=shutil.ignore_patterns(EMBEDDINGS, "analysis")
    )
    assert_one_line_error(invoke("case", "--run", str(bare), "--user", "u00004"), "perpeft-engine embed")


def test_curves_writes_the_png_into_the_run_and_refuses_to_overwrite(demo_run, assert_one_line_error):
    result = CliRunner().invoke(cli, ["analyze", "curves", "--run", str(demo_run)])
    assert result.exit_code == 0, result.output
    assert (demo_run / "analysis" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    again = CliRunner().invoke(cli, ["analyze", "curves", "--run", str(demo_run)])
    assert_one_line_error(again, "curves.png: exists; pass --overwrite")
