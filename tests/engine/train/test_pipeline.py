"""The pipeline end to end on a small demo: run directory contents, metrics schema, resume."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from perpeft.engine.config.run_config import ResolvedConfig, RunConfig
from perpeft.engine.data.formats import load_recbole
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.errors import InputError
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.runtime.tensors import load_tensors
from perpeft.engine.train.pipeline import resume_run, train_new_run, trained_config

METRIC_KEYS = {"HR@10", "HR@20", "HR@30", "NDCG@10", "NDCG@20", "NDCG@30"}


class Interrupt(Exception):
    pass


@pytest.fixture
def two_epoch_config(small_config):
    def make(data: Path, **changes) -> RunConfig:
        return small_config(data, epochs_global=2, epochs_perpeft=2, **changes)

    return make


def interrupt_at(line_start: str):
    def report(line: str) -> None:
        if line.startswith(line_start):
            raise Interrupt(line)

    return report


def test_run_directory_and_metrics_schema(small_demo, two_epoch_config, tmp_path, assert_learned):
    run, metrics = train_new_run(
        two_epoch_config(small_demo), tmp_path / "run", False, lambda line: None, progress=False
    )
    on_disk = json.loads((run.path / "metrics.json").read_text())
    assert on_disk == metrics
    assert {"dataset", "peft", "groups", "seed", "global", "perpeft"} <= set(metrics)
    assert (metrics["dataset"], metrics["peft"], metrics["groups"], metrics["seed"]) == ("shop", "lora", 2, 0)
    assert metrics["global"]["epochs"] == 4 and metrics["perpeft"]["epochs"] == 2
    for stage in ("global", "perpeft"):
        assert 1 <= metrics[stage]["best_epoch"] <= metrics[stage]["epochs"]
        for split in ("valid", "test"):
            assert set(metrics[stage][split]) == METRIC_KEYS
            assert all(0.0 <= value <= 1.0 for value in metrics[stage][split].values())
    assert_learned(run.path)
    # The groups follow the demo's planted interest domains more than a random assignment of the same sizes
    # does: adjusted Rand index above every one of 1,000 random permutations (p < 0.001).
    planted = json.loads((small_demo / "planted.json").read_text())["users"]
    dataset = load_recbole(small_demo)
    domains = [planted[user] for user in dataset.user_ids[1:]]
    groups = load_tensors(run.grouping)[0]["assignment"].numpy()[1:]
    rng = np.random.default_rng(0)
    chance = [adjusted_rand_score(domains, rng.permutation(groups)) for _ in range(1000)]
    assert adjusted_rand_score(domains, groups) > max(chance)
    for name in (
        "config.json",
        "global/best.safetensors",
        "global/snapshot-e1.safetensors",
        "grouping.safetensors",
        "perpeft/best.safetensors",
    ):
        assert (run.path / name).is_file(), name
    config = two_epoch_config(small_demo)
    assert ResolvedConfig.from_json_file(run.path / "config.json") == trained_config(config, run_dataset(config))[0]


def test_no_baseline_stops_global_at_e1(small_demo, two_epoch_config, tmp_path):
    _, metrics = train_new_run(
        two_epoch_config(small_demo, baseline=False), tmp_path / "run", False, lambda line: None, progress=False
    )
    assert metrics["global"]["epochs"] == 2
    assert metrics["global"]["model"] == "stage1"


@pytest.mark.parametrize("stop_at", ["global epoch 3/4", "perpeft epoch 1/2"])
def test_resume_equals_uninterrupted(small_demo, two_epoch_config, tmp_path, stop_at):
    config = two_epoch_config(small_demo)
    _, uninterrupted = train_new_run(config, tmp_path / "whole", False, lambda line: None, progress=False)
    with pytest.raises(Interrupt):
        train_new_run(config, tmp_path / "cut", False, interrupt_at(stop_at), progress=False)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    _, resumed = resume_run(tmp_path / "cut", lambda line: None, progress=False)
    assert resumed == uninterrupted


def test_sasrec_compiles_on_cuda_only_by_default():
    from perpeft.engine.runtime.device import compiles_sasrec

    assert not compiles_sasrec("auto", torch.device("cpu"))
    assert compiles_sasrec("auto", torch.device("cuda"))
    assert compiles_sasrec("on", torch.device("cpu"))
    assert not compiles_sasrec("off", torch.device("cuda"))


@pytest.mark.parametrize("peft", ["lora", "ia3", "iisan"])
def test_every_group_starts_as_the_global_model(small_demo, small_config, peft):
    """Paper §3.3.3: each group's PEFT module and projector start from Global PEFT's, so before stage 2
    every group (and a mixed-group batch) encodes every item exactly as the Global model does."""
    config = small_config(small_demo, peft=peft, groups=3).resolved()
    inputs = load_run_inputs(config, run_dataset(config), progress=False)
    torch.manual_seed(0)
    global_model = PerpeftModel(config, inputs.make_encoder, inputs.inputs, inputs.dataset.num_items, 1).eval()
    with torch.no_grad():  # move off the initialisation (LoRA B = 0, (IA)3 = 1) so a wrong copy would show
        for parameter in global_model.trainable_state().values():
            parameter.add_(0.05 * torch.randn_like(parameter))
    grouped = PerpeftModel(config, inputs.make_encoder, inputs.inputs, inputs.dataset.num_items, 3).eval()
    grouped.init_from_single_group(global_model.trainable_state())
    items = torch.arange(1, 25)
    with torch.no_grad():
        expected = global_model.item_vectors(items, 0)
        for group in range(3):
            torch.testing.assert_close(grouped.item_vectors(items, group), expected, rtol=0, atol=0)
        torch.testing.assert_close(grouped.item_vectors(items, torch.arange(24) % 3), expected, rtol=1e-5, atol=1e-5)


def test_log_dir_writes_every_epoch_record_as_tensorboard_scalars(small_demo, two_epoch_config, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = two_epoch_config(small_demo, baseline=False)
    run, _ = train_new_run(config, tmp_path / "run", False, lambda line: None, False, log_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    state = json.loads((run.path / "state.json").read_text())
    e1 = run.config.epochs_global
    for stage, offset in (("global", 0), ("perpeft", e1)):
        history = state[stage]["history"]
        loss = events.Scalars(f"{stage}/loss")
        assert [event.step for event in loss] == [offset + record["epoch"] for record in history]
        assert [event.value for event in loss] == pytest.approx([record["loss"] for record in history])
        assert [event.value for event in events.Scalars(f"{stage}/valid/HR@30")] == pytest.approx(
            [record["valid"]["HR@30"] for record in history]
        )
        assert [event.value for event in events.Scalars(f"{stage}/norms/id")] == pytest.approx(
            [record["norms"]["id"] for record in history]
        )


def test_log_dir_without_tensorboard_is_refused_before_the_run_starts(
    small_demo, two_epoch_config, tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(InputError, match="install the tensorboard package"):
        train_new_run(two_epoch_config(small_demo), tmp_path / "run", False, lambda line: None, False, log_dir=tmp_path)
    assert not (tmp_path / "run").exists()
