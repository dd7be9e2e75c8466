"""Training curves of a run: every stage's records on one epoch axis, drawn as a PNG."""

import json
from pathlib import Path

import pytest

from perpeft.engine.analysis.curves import stage_curves, write_curves
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.run_directory import RunDirectory


def test_the_second_stage_is_drawn_after_the_global_stages_first_e1_epochs(demo_run: Path) -> None:
    run = RunDirectory.open(demo_run)
    state = json.loads((demo_run / "state.json").read_text())
    curves = stage_curves(run)
    assert list(curves) == ["global", "perpeft"]
    e1 = run.config.epochs_global
    assert curves["global"][0] == [record["epoch"] for record in state["global"]["history"]]
    assert curves["perpeft"][0] == [e1 + record["epoch"] for record in state["perpeft"]["history"]]
    assert [record.to_json() for record in curves["perpeft"][1]] == state["perpeft"]["history"]


def test_the_png_is_written_once_unless_overwritten(demo_run: Path, tmp_path: Path) -> None:
    run = RunDirectory.open(demo_run)
    png = tmp_path / "curves.png"
    write_curves(run, png, overwrite=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        write_curves(run, png, overwrite=False)
    write_curves(run, png, overwrite=True)


def test_a_run_without_a_finished_epoch_has_nothing_to_draw(demo_run: Path, tmp_path: Path) -> None:
    (demo_run / "state.json").unlink()
    with pytest.raises(InputError, match="no epoch finished yet"):
        stage_curves(RunDirectory.open(demo_run))
