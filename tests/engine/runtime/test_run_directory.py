"""The run directory: every file of a run is named here, creation refuses to clobber, reads fail in one line."""

import json
from pathlib import Path

import pytest

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_state import GroupingRecord, RunState, StageProgress


def test_a_new_run_holds_its_config_and_nothing_else(tmp_path: Path) -> None:
    config = RunConfig(seed=3)
    run = RunDirectory.create(tmp_path / "run", config, overwrite=False)
    assert RunDirectory.holds_run(run.path)
    assert run.config == config
    assert [path.name for path in run.path.iterdir()] == ["config.json"]
    assert run.read_state() == RunState()
    assert not run.finished


def test_an_existing_directory_is_kept_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="--overwrite"):
        RunDirectory.create(tmp_path / "run", RunConfig(), overwrite=False)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
    RunDirectory.create(tmp_path / "run", RunConfig(), overwrite=True)
    assert not (tmp_path / "run" / "keep.txt").exists()


def test_paths_stay_inside_the_run_and_follow_its_layout(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig(), overwrite=False)
    paths = {
        run.checkpoint("perpeft", 7): "perpeft/epoch-007.safetensors",
        run.best("global"): "global/best.safetensors",
        run.snapshot: "global/snapshot-e1.safetensors",
        run.grouping: "grouping.safetensors",
        run.embedded_items: "embeddings/items.safetensors",
        run.embedded_users: "embeddings/users.safetensors",
        run.embedded_snapshot: "embeddings/snapshot.safetensors",
        run.embedded_ids: "embeddings/ids.json",
        run.embedding_chunks: "embeddings/.partial",
    }
    for path, relative in paths.items():
        assert path.relative_to(run.path).as_posix() == relative
    assert run.embedding_outputs == (run.embedded_items, run.embedded_users, run.embedded_snapshot, run.embedded_ids)
    assert run.reseed_path(4) == tmp_path / "run-reseed-4"


def test_stage_files_skip_temporary_ones(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig(), overwrite=False)
    run.best("global").parent.mkdir()
    for name in ("best.safetensors", "epoch-002.safetensors", ".epoch-003.safetensors.tmp"):
        (run.path / "global" / name).write_bytes(b"")
    assert [path.name for path in run.stage_files("global")] == ["best.safetensors", "epoch-002.safetensors"]


def test_state_and_metrics_round_trip_and_unfinished_reads_fail(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig(), overwrite=False)
    with pytest.raises(InputError, match="run not finished"):
        run.read_metrics()
    with pytest.raises(InputError, match="not finished"):
        run.best_checkpoint("perpeft")
    state = RunState(
        {"global": StageProgress(2, [{"epoch": 1}, {"epoch": 2}], {"epoch": 2})},
        GroupingRecord([3, 4], "interest", "kmeans"),
    )
    run.write_state(state)
    assert run.read_state() == state
    assert json.loads((run.path / "state.json").read_text()) == {
        "global": {"completed_epochs": 2, "history": [{"epoch": 1}, {"epoch": 2}], "best": {"epoch": 2}},
        "grouping": {"sizes": [3, 4], "grouping": "interest", "clustering": "kmeans"},
    }
    metrics = {"dataset": "shop", "method": "global-peft", "groups": 8, "seed": 0, "result": "global", "global": {}}
    run.write_metrics(metrics)
    assert run.finished and run.read_metrics() == metrics
    assert run.best_checkpoint("global") == run.best("global")
    with pytest.raises(InputError, match="no perpeft stage"):
        run.best_checkpoint("perpeft")
    assert json.loads((run.path / "metrics.json").read_text())["method"] == "global-peft"


@pytest.mark.parametrize("content", [b'{"method": "perpeft"', b'{"method": "perpeft"}', b"\x00\x01"])
def test_a_damaged_metrics_file_is_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig(), overwrite=False)
    (run.path / "metrics.json").write_bytes(content)
    with pytest.raises(InputError, match=r"metrics.json: (damaged or unreadable|not a run's metrics)") as caught:
        run.read_metrics()
    assert "\n" not in str(caught.value)


def test_opening_a_directory_without_a_config_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a run directory"):
        RunDirectory.open(tmp_path)


def test_a_state_json_with_unknown_keys_is_refused_naming_the_file(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig(), overwrite=False)
    (run.path / "state.json").write_text(json.dumps({"global": {"completed_epochs": 1, "history": []}, "colour": 1}))
    with pytest.raises(InputError, match=r"state\.json: unknown progress keys \['colour'\]"):
        run.read_state()
    (run.path / "state.json").write_text(json.dumps({"global": {"epochs": 1}}))
    with pytest.raises(InputError, match=r"state\.json: malformed progress record"):
        run.read_state()
