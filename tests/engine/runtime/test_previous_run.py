"""A run written before the typed configuration and records (config.json, state.json and metrics.json of a
demo PerPEFT LoRA run, as the previous release wrote them) reads back through the types and is written again
byte for byte, so old run directories resume, embed and evaluate."""

import re
import shutil
from pathlib import Path

import pytest

from perpeft.engine.config.run_config import ResolvedConfig
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.run_directory import RunDirectory

PREVIOUS = Path(__file__).with_name("previous_run")


@pytest.fixture
def previous(tmp_path: Path) -> RunDirectory:
    shutil.copytree(PREVIOUS, tmp_path / "run")
    return RunDirectory.open(tmp_path / "run")


def test_a_previous_run_reads_through_the_types_and_writes_back_the_same_bytes(previous: RunDirectory) -> None:
    config = previous.config
    assert isinstance(config, ResolvedConfig)
    assert (config.method, config.peft, config.lr, config.epochs_global) == ("perpeft", "lora", 1e-3, 6)
    assert config.to_json() + "\n" == (PREVIOUS / "config.json").read_text()
    state = previous.read_state()
    assert state.done and state.grouping is not None
    assert state.stage("perpeft").best is not None
    previous.write_state(state)
    assert (previous.path / "state.json").read_bytes() == (PREVIOUS / "state.json").read_bytes()
    metrics = previous.read_run_metrics()
    previous.write_metrics(metrics)
    assert (previous.path / "metrics.json").read_bytes() == (PREVIOUS / "metrics.json").read_bytes()
    assert previous.read_metrics()["perpeft"]["test"] == metrics.to_json()["perpeft"]["test"]


def test_a_damaged_record_is_named_in_one_line(previous: RunDirectory) -> None:
    text = re.sub(r'"loss": [0-9.e-]+', '"loss": "low"', (PREVIOUS / "state.json").read_text(), count=1)
    (previous.path / "state.json").write_text(text)
    with pytest.raises(InputError, match=r"state.json: .*history\[0\]") as error:
        previous.read_state()
    assert "\n" not in str(error.value)
