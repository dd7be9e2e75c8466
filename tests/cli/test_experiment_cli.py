"""`perpeft-engine experiment`: ``--groups`` means C for every cell, as in ``train``; Figure 7(b) has its own option."""

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from perpeft.cli.main import cli
from perpeft.engine import api


@pytest.fixture
def grids(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the command asks the API for, without training."""
    calls: list[dict[str, Any]] = []

    def experiment(config: api.RunConfig, out: Path, **options: Any) -> list[dict[str, str]]:
        calls.append({"config": config, **options})
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text("table\n")
        return []

    monkeypatch.setattr(api, "experiment", experiment)
    return calls


def test_groups_sets_c_of_every_cell(grids: list[dict[str, Any]], tmp_path: Path) -> None:
    arguments = ["experiment", "--methods", "global-peft,perpeft", "--groups", "3", "--seeds", "0"]
    result = CliRunner().invoke(cli, [*arguments, "--out", str(tmp_path / "grid")])
    assert result.exit_code == 0, result.output
    (call,) = grids
    assert call["config"].groups == 3
    assert call["group_counts"] == []


def test_group_counts_adds_figure_7b_cells_at_the_default_c(grids: list[dict[str, Any]], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["experiment", "--group-counts", "4,8,16", "--out", str(tmp_path / "grid")])
    assert result.exit_code == 0, result.output
    (call,) = grids
    assert (call["config"].groups, call["group_counts"]) == (8, [4, 8, 16])


def test_a_list_for_groups_names_the_figure_7b_option(grids: list[dict[str, Any]], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["experiment", "--groups", "4,8,16", "--out", str(tmp_path / "grid")])
    assert result.exit_code == 2
    assert "--group-counts 4,8,16" in result.output
    assert not grids
