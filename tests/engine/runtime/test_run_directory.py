"""The run directory: every file of a run is named here, creation refuses to clobber, reads fail in one line."""

import json
from pathlib import Path

import pytest

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.records import BestRecord, EpochRecord, RunMetrics, StageSummary
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_state import GroupingRecord, RunState, StageProgress

SCORES = {"HR@10": 0.25, "NDCG@10": 0.125}


def test_a_new_run_holds_its_config_and_nothing_else(tmp_path: Path) -> None:
    config = RunConfig(seed=3).resolved()
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
        RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
    RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=True)
    assert not (tmp_path / "run" / "keep.txt").exists()


def test_paths_stay_inside_the_run_and_follow_its_layout(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
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
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    run.best("global").parent.mkdir()
    for name in ("best.safetensors", "epoch-002.safetensors", ".epoch-003.safetensors.tmp"):
        (run.path / "global" / name).write_bytes(b"")
    assert [path.name for path in run.stage_files("global")] == ["best.safetensors", "epoch-002.safetensors"]


def test_state_and_metrics_round_trip_and_unfinished_reads_fail(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    with pytest.raises(InputError, match="run not finished"):
        run.read_metrics()
    with pytest.raises(InputError, match="not finished"):
        run.best_checkpoint("perpeft")
    history = [EpochRecord(epoch, 1.5, 2.0, 1.0, 1024, SCORES, SCORES, {"id": 0.5}) for epoch in (1, 2)]
    state = RunState(
        {"global": StageProgress(2, history, BestRecord.of(history[1]))}, GroupingRecord([3, 4], "interest", "kmeans")
    )
    run.write_state(state)
    assert run.read_state() == state
    record = {
        "epoch": 1,
        "loss": 1.5,
        "seconds": 2.0,
        "train_seconds": 1.0,
        "train_peak_bytes": 1024,
        "valid": SCORES,
        "test": SCORES,
        "norms": {"id": 0.5},
    }
    assert json.loads((run.path / "state.json").read_text()) == {
        "global": {
            "completed_epochs": 2,
            "history": [record, {**record, "epoch": 2}],
            "best": {"epoch": 2, "valid": SCORES, "test": SCORES},
        },
        "grouping": {"sizes": [3, 4], "grouping": "interest", "clustering": "kmeans"},
    }
    summary = StageSummary(2, 2, SCORES, SCORES)
    metrics = RunMetrics("shop", "global-peft", "lora", 8, 0, None, "global", {"global": summary})
    run.write_metrics(metrics)
    assert run.finished and run.read_run_metrics() == metrics
    assert run.read_metrics() == {
        "dataset": "shop",
        "method": "global-peft",
        "peft": "lora",
        "groups": 8,
        "seed": 0,
        "result": "global",
        "global": {"best_epoch": 2, "epochs": 2, "valid": SCORES, "test": SCORES},
    }
    assert run.best_checkpoint("global") == run.best("global")
    with pytest.raises(InputError, match="no perpeft stage"):
        run.best_checkpoint("perpeft")
    assert json.loads((run.path / "metrics.json").read_text())["method"] == "global-peft"


@pytest.mark.parametrize("content", [b'{"method": "perpeft"', b'{"method": "perpeft"}', b"\x00\x01"])
def test_a_damaged_metrics_file_is_refused_in_one_line(tmp_path: Path, content: bytes) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    (run.path / "metrics.json").write_bytes(content)
    with pytest.raises(InputError, match=r"metrics.json: (damaged or unreadable|not a run's metrics)") as caught:
        run.read_metrics()
    assert "\n" not in str(caught.value)


def test_opening_a_directory_without_a_config_fails_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a run directory"):
        RunDirectory.open(tmp_path)


def test_a_state_json_with_unknown_keys_is_refused_naming_the_file(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    (run.path / "state.json").write_text(json.dumps({"global": {"completed_epochs": 1, "history": []}, "colour": 1}))
    with pytest.raises(InputError, match=r"state\.json: unknown progress keys \['colour'\]"):
        run.read_state()
    (run.path / "state.json").write_text(json.dumps({"global": {"epochs": 1}}))
    with pytest.raises(InputError, match=r"state\.json: malformed progress record"):
        run.read_state()


def _written(values: dict) -> str:
    return json.dumps(values, indent=2, sort_keys=True) + "\n"  # as `atomic_write_json` writes


OLD_RECORD = {  # before the norms were recorded; a metric of 0 written as an integer
    "epoch": 1,
    "loss": 2.5,
    "seconds": 3.25,
    "train_seconds": 3.0,
    "train_peak_bytes": 2**20,
    "valid": {"HR@10": 0, "NDCG@10": 0.0},
    "test": {"HR@10": 0.1, "NDCG@10": 0.05},
}
OLD_STATE = {
    "global": {
        "completed_epochs": 1,
        "history": [OLD_RECORD],
        "best": {"epoch": 1, "valid": OLD_RECORD["valid"], "test": OLD_RECORD["test"]},
    },
    "grouping": {"sizes": [2, 3], "grouping": "interest", "clustering": "kmeans"},
    "perpeft": {"completed_epochs": 0, "history": []},
    "done": True,
}
SUMMARY = {"best_epoch": 1, "epochs": 1, "valid": OLD_RECORD["valid"], "test": OLD_RECORD["test"]}
OLD_METRICS = {
    "dataset": "shop",
    "method": "perpeft",
    "peft": None,
    "groups": 2,
    "seed": 1,
    "global_seed": 0,
    "result": "perpeft",
    "global": {**SUMMARY, "model": "stage1"},
    "perpeft": SUMMARY,
}


def test_records_read_and_written_again_are_the_same_bytes(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    (run.path / "state.json").write_text(_written(OLD_STATE))
    (run.path / "metrics.json").write_text(_written(OLD_METRICS))
    state, metrics = run.read_state(), run.read_run_metrics()
    assert state.stage("global").history[0].norms is None and metrics.stages["global"].model == "stage1"
    run.write_state(state)
    run.write_metrics(metrics)
    assert (run.path / "state.json").read_text() == _written(OLD_STATE)
    assert (run.path / "metrics.json").read_text() == _written(OLD_METRICS)
    assert run.read_metrics() == OLD_METRICS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss": "low"}, r"history\[0\]\.loss: a number expected, not 'low'"),
        ({"epoch": 1.0}, r"history\[0\]\.epoch: an integer expected"),
        ({"valid": [0.1]}, r"history\[0\]\.valid: a JSON object of numbers expected"),
        ({"test": {"HR@10": None}}, r"history\[0\]\.test\.HR@10: a number expected"),
        ({"colour": 1}, r"history\[0\]: keys unknown \['colour'\]"),
    ],
)
def test_a_malformed_epoch_record_is_refused_naming_the_file_and_the_record(
    tmp_path: Path, change: dict, message: str
) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    stage = {**OLD_STATE["global"], "history": [{**OLD_RECORD, **change}]}
    (run.path / "state.json").write_text(json.dumps({**OLD_STATE, "global": stage}))
    with pytest.raises(
        InputError, match=r"state\.json: malformed progress record of stage 'global': " + message
    ) as caught:
        run.read_state()
    assert "\n" not in str(caught.value) and str(caught.value).endswith("start it again with --overwrite")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": None}, r"seed: an integer expected"),
        ({"groups": True}, r"groups: an integer expected"),
        ({"result": "grouped"}, r"the result's stage 'grouped' has no entry"),
        ({"perpeft": {**SUMMARY, "colour": 1}}, r"perpeft: keys unknown \['colour'\]"),
        ({"global": {"epochs": 1}}, r"global: keys missing \['best_epoch', 'valid', 'test'\]"),
        ({"colour": 1}, r"keys unknown \['colour'\]"),
    ],
)
def test_malformed_metrics_are_refused_naming_the_file(tmp_path: Path, change: dict, message: str) -> None:
    run = RunDirectory.create(tmp_path / "run", RunConfig().resolved(), overwrite=False)
    (run.path / "metrics.json").write_text(json.dumps({**OLD_METRICS, **change}))
    with pytest.raises(InputError, match=r"metrics\.json: not a run's metrics: " + message) as caught:
        run.read_metrics()
    assert "\n" not in str(caught.value)
