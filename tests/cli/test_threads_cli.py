"""`perpeft-engine --threads N` (or $PERPEFT_THREADS) sets the CPU threads every command computes with; every
command keeps freed memory for reuse."""

import pytest
import torch
from click.testing import CliRunner

from perpeft.cli.main import cli


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("arguments", "environment"), [(["--threads", "1"], {}), ([], {"PERPEFT_THREADS": "1"})])
def test_threads_option_and_variable(restore_threads, arguments, environment):
    torch.set_num_threads(2)
    result = CliRunner().invoke(cli, [*arguments, "params", "--items", "10"], env=environment)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1


def test_no_threads_setting_keeps_the_default(restore_threads):
    torch.set_num_threads(2)
    result = CliRunner().invoke(cli, ["params", "--items", "10"], env={"PERPEFT_THREADS": None})
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2


def test_bad_thread_count_is_a_usage_error():
    result = CliRunner().invoke(cli, ["--threads", "0", "params", "--items", "10"])
    assert result.exit_code == 2
    assert "--threads" in result.output


def test_every_command_reuses_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr("perpeft.cli.main.reuse_freed_memory", lambda: calls.append(True))
    result = CliRunner().invoke(cli, ["params", "--items", "10"])
    assert result.exit_code == 0, result.output
    assert calls == [True]
