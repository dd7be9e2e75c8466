"""A run that reuses another run's Global stage and groups (`train --global-from`, Table 7's intra runs)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.run_directory import GROUPING, RunDirectory
from perpeft.engine.runtime.tensors import load_tensors
from perpeft.engine.train.pipeline import train_new_run
from perpeft.engine.train.reseed import reseeded_config


def quiet_train(config: RunConfig, out: Path, global_from: RunDirectory | None = None) -> dict:
    return train_new_run(config, out, False, lambda line: None, False, global_from=global_from)[1]


@pytest.fixture(scope="module")
def source(_trained_run: Path) -> RunDirectory:
    """The session's small trained run (seed 0, C = 2), read only."""
    return RunDirectory.open(_trained_run)


@pytest.fixture(scope="module")
def reseeded(source: RunDirectory, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reseeded") / "run"
    return out, quiet_train(reseeded_config(source, 5), out, global_from=source)


def test_reseeded_run_copies_the_global_stage_and_retrains_the_second(source, reseeded):
    out, metrics = reseeded
    config = RunDirectory.open(out).config
    assert (config.seed, config.global_seed) == (5, 0)
    assert dataclasses.replace(config, seed=0, global_seed=None) == source.config
    for path in sorted((source.path / "global").glob("*.safetensors")):
        assert (out / "global" / path.name).read_bytes() == path.read_bytes(), path.name
    assert (out / GROUPING).read_bytes() == source.grouping.read_bytes()
    source_state, state = source.read_state(), RunDirectory.open(out).read_state()
    assert state.stage("global") == source_state.stage("global") and state.grouping == source_state.grouping
    source_metrics = source.read_metrics()
    assert metrics["global"] == source_metrics["global"]
    assert (metrics["seed"], metrics["global_seed"]) == (5, 0) and "global_seed" not in source_metrics
    # Another seed for the second stage: other batches, negatives and dropout, so another loss.
    assert state.stage("perpeft").history[0].loss != source_state.stage("perpeft").history[0].loss


def test_global_seed_drives_the_global_stage_and_grouping(source, reseeded, small_demo, small_config, tmp_path):
    """Trained from scratch, a run with global_seed 0 and seed 5 repeats the seed-0 run's Global stage and
    groups and the copied run's second stage: the configuration alone says what the run is."""
    config = small_config(small_demo, seed=5, global_seed=0)
    metrics = quiet_train(config, tmp_path / "scratch")
    state = RunDirectory.open(tmp_path / "scratch").read_state()
    source_state = source.read_state()
    np.testing.assert_allclose(
        [epoch.loss for epoch in state.stage("global").history],
        [epoch.loss for epoch in source_state.stage("global").history],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(
        load_tensors(tmp_path / "scratch" / GROUPING)[0]["assignment"],
        load_tensors(source.grouping)[0]["assignment"],
    )
    copied = RunDirectory.open(reseeded[0]).read_state()
    np.testing.assert_allclose(
        [epoch.loss for epoch in state.stage("perpeft").history],
        [epoch.loss for epoch in copied.stage("perpeft").history],
        rtol=1e-6,
    )
    assert metrics["perpeft"]["test"] == pytest.approx(reseeded[1]["perpeft"]["test"], rel=1e-6)


def test_reseeding_refuses_what_it_cannot_reuse(source, small_demo, small_config, tmp_path):
    with pytest.raises(InputError, match="trained its second stage with this seed"):
        reseeded_config(source, 0)
    single = tmp_path / "single"
    quiet_train(small_config(small_demo, method="global-peft"), single)
    with pytest.raises(InputError, match="global-peft run has no Global stage and grouping"):
        reseeded_config(RunDirectory.open(single), 1)
    unfinished = tmp_path / "unfinished"
    (unfinished / "global").mkdir(parents=True)
    (unfinished / "config.json").write_text(source.config.to_json())
    state = source.read_state()
    (unfinished / "state.json").write_text(json.dumps({"global": state.stage("global").to_json()}))
    with pytest.raises(InputError, match="not finished"):
        reseeded_config(RunDirectory.open(unfinished), 1)
    with pytest.raises(InputError, match="single stage"):
        small_config(small_demo, method="frozen-mm", global_seed=0).resolved()
    # The engine refuses to copy a Global stage into a run whose settings would train another one.
    for changes in ({"lr": 5e-4, "global_seed": 0}, {"global_seed": 3}):
        with pytest.raises(ValueError, match="another Global stage"):
            quiet_train(small_config(small_demo, seed=4, **changes), tmp_path / "mismatch", global_from=source)
    assert not (tmp_path / "mismatch").exists()
    with pytest.raises(ValueError, match="machine settings"):
        reseeded_config(source, 1, lr=0.1)


def test_stage_seed():
    assert [RunConfig(seed=3).stage_seed(stage) for stage in ("global", "grouping", "perpeft")] == [3, 3, 3]
    config = RunConfig(seed=3, global_seed=1)
    assert [config.stage_seed(stage) for stage in ("global", "grouping", "perpeft", "grouped")] == [1, 1, 3, 3]
