"""Faults a long run meets — a damaged checkpoint or state file, a second writer, a diverging loss, a full
disk — each one line on stderr with nothing written lost, and `--resume` continuing once the cause is gone
to the metrics of a run that never met it."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from perpeft.cli.main import cli
from perpeft.engine.errors import RunError
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime import atomic
from perpeft.engine.runtime.tensors import load_tensors
from perpeft.engine.train import grouping, stages

# With the E1+E2 baseline, Global PEFT trains 4 epochs, then PerPEFT 1.
SETTINGS = ["--clip", "tiny", "--groups", "2", "--epochs-global", "3", "--epochs-perpeft", "1"]
SETTINGS += ["--lr", "1e-3", "--weight-decay", "1e-4", "--quiet"]


class Crash(Exception):
    """Stands for a process killed mid-epoch: nothing after it runs."""


def train(*args: str) -> object:
    return CliRunner().invoke(cli, ["train", *args])


def command(*args: str, **options: object) -> subprocess.CompletedProcess:
    """``python -m perpeft.cli ARGS`` in a real process."""
    return subprocess.run(
        [sys.executable, "-m", "perpeft.cli", *args], capture_output=True, text=True, timeout=600, **options
    )


def one_line(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def temporaries(run: Path) -> list[Path]:
    return [path for path in run.rglob(".*") if path.name != ".lock"]


@pytest.fixture(scope="module")
def uninterrupted(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The metrics of the run every test's run must end with."""
    run = tmp_path_factory.mktemp("whole") / "run"
    result = train("--data", str(small_demo), *SETTINGS, "--out", str(run))
    assert result.exit_code == 0, result.output
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture
def interrupted(small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same run stopped by a crash in Global PEFT's third epoch: epochs 1 and 2 are checkpointed."""
    evaluate, evaluations = stages.evaluate_model, []

    def crash_at_the_third(*args: object) -> object:
        evaluations.append(1)
        if len(evaluations) == 3:
            raise Crash
        return evaluate(*args)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(stages, "evaluate_model", crash_at_the_third)
        result = train("--data", str(small_demo), *SETTINGS, "--out", str(run))
    assert isinstance(result.exception, Crash)
    assert sorted(path.name for path in (run / "global").iterdir()) == [
        "best.safetensors",
        "epoch-001.safetensors",
        "epoch-002.safetensors",
    ]
    return run


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(interrupted: Path, uninterrupted: dict) -> None:
    newest = interrupted / "global" / "epoch-002.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as a crash or a full disk leaves a file
    result = train("--resume", str(interrupted), "--quiet")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if str(newest) in line]
    assert len(warnings) == 1 and "global resumes from epoch 1" in warnings[0], result.stderr
    assert json.loads((interrupted / "metrics.json").read_text()) == uninterrupted


def test_no_intact_checkpoint_is_refused_in_one_line(interrupted: Path) -> None:
    for epoch in (1, 2):
        (interrupted / "global" / f"epoch-00{epoch}.safetensors").write_bytes(b"\0" * 64)
    state = (interrupted / "state.json").read_bytes()
    result = train("--resume", str(interrupted), "--quiet")
    assert result.exit_code == 2
    one_line(result.stderr, "epoch-002.safetensors: damaged", "no earlier checkpoint", "--overwrite")
    assert (interrupted / "state.json").read_bytes() == state


@pytest.mark.parametrize("content", [b'{"global": {"completed_ep', b"[1, 2]", b"\xff\xfe"])
def test_a_damaged_state_file_is_refused_in_one_line(interrupted: Path, content: bytes) -> None:
    (interrupted / "state.json").write_bytes(content)
    result = train("--resume", str(interrupted), "--quiet")
    assert result.exit_code == 2
    one_line(result.stderr, "state.json", "cannot resume", "--overwrite")


def test_a_second_writer_is_refused_and_a_killed_writers_lock_taken_over(
    interrupted: Path, uninterrupted: dict
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(interrupted)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # In this process (the holder is another one): the refusal needs no interpreter of its own.
        for refused in (["train", "--resume", str(interrupted), "--quiet"], ["embed", "--run", str(interrupted)]):
            result = CliRunner().invoke(cli, refused)
            assert result.exit_code == 2
            one_line(result.stderr, f"{interrupted}: in use by pid {holder.pid} on ", "ago)", "one writer at a time")
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the OS releases it, the record stays
        holder.wait()
    done = command("train", "--resume", str(interrupted), "--quiet")
    assert done.returncode == 0, done.stderr
    taken = [line for line in done.stderr.splitlines() if "took over the lock" in line]
    assert len(taken) == 1 and f"pid {holder.pid}" in taken[0]
    assert json.loads((interrupted / "metrics.json").read_text()) == uninterrupted
    assert (interrupted / ".lock").read_text() == ""  # released cleanly: nothing left to take over


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from perpeft.engine.runtime.run_lock import holding_run_lock
with holding_run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_diverging_run_stops_at_the_step_in_one_line(small_demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train("--data", str(small_demo), *SETTINGS, "--lr", "1e4", "--out", str(run))
    assert result.exit_code == 1
    one_line(
        result.stderr, "training diverged in Global PEFT, epoch 1, at step ", "the loss is not finite", "--lr 10000"
    )
    assert list(run.rglob("*.safetensors")) == [] and not (run / "state.json").exists()


def test_divergence_keeps_the_last_good_epoch_and_resume_goes_on_from_it(
    small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict
) -> None:
    evaluate, forward = stages.evaluate_model, PerpeftModel.forward
    evaluations, steps = [], []

    def counted_evaluation(*args: object) -> object:
        evaluations.append(1)
        steps.clear()
        return evaluate(*args)

    def nan_at_the_third_step_of_epoch_two(self: PerpeftModel, *args: object) -> torch.Tensor:
        loss = forward(self, *args)
        if self.training:
            steps.append(1)
            if len(evaluations) == 1 and len(steps) == 3:
                return loss * float("nan")
        return loss

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(stages, "evaluate_model", counted_evaluation)
        patch.setattr(PerpeftModel, "forward", nan_at_the_third_step_of_epoch_two)
        result = train("--data", str(small_demo), *SETTINGS, "--out", str(run))
    assert result.exit_code == 1
    one_line(result.stderr, "Global PEFT, epoch 2, at step 3 of ", "epoch 1's checkpoint is kept")
    state = json.loads((run / "state.json").read_text())
    assert state["global"]["completed_epochs"] == 1
    load_tensors(run / "global" / "epoch-001.safetensors")
    assert not (run / "global" / "epoch-002.safetensors").exists()
    result = train("--resume", str(run), "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "metrics.json").read_text()) == uninterrupted


def test_the_grouping_never_sees_a_vector_that_is_not_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = torch.ones(10, 4)
    vectors[3, 1] = float("nan")
    monkeypatch.setattr(grouping, "user_space_vectors", lambda *args: vectors)
    config = type("Config", (), {"groups": 2, "lr": 0.5})()
    with pytest.raises(RunError, match=r"1 of 10 user vectors .* are not finite"):
        grouping.fit_groups(None, None, 0, config)  # type: ignore[arg-type]


def test_a_refused_write_names_the_file_and_leaves_it_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic.atomic_write_json(target, {"epoch": 1})

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(RunError, match=f"{target}: cannot write \\(No space left on device\\); what was there"):
        atomic.atomic_write_json(target, {"epoch": 2})
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 4 MiB tmpfs (needs the right to mount: root), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_resume_goes_on_once_space_is_back(
    small_demo: Path, small_disk: Path, uninterrupted: dict
) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (4 * 2**20 - 640 * 2**10))  # room for one epoch's files, not two
    run = small_disk / "run"
    done = command("train", "--data", str(small_demo), *SETTINGS, "--out", str(run))
    assert done.returncode == 1
    one_line(done.stderr, f"{run}/", "cannot write (No space left on device); what was there is intact")
    assert temporaries(run) == []
    state = json.loads((run / "state.json").read_text())
    completed = state["global"]["completed_epochs"]
    assert completed >= 1
    load_tensors(run / "global" / f"epoch-{completed:03d}.safetensors")  # the previous checkpoint, intact
    filler.unlink()
    done = command("train", "--resume", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "metrics.json").read_text()) == uninterrupted


@pytest.mark.parametrize(
    ("damaged", "command"),
    [
        ("grouping.safetensors", ["embed", "--overwrite", "--quiet"]),
        ("perpeft/best.safetensors", ["embed", "--overwrite", "--quiet"]),
        ("embeddings/users.safetensors", ["recommend", "--history", "ITEM"]),
    ],
)
def test_a_damaged_file_of_a_finished_run_is_refused_by_its_readers(
    embedded_copy: Path, damaged: str, command: list[str]
) -> None:
    path = embedded_copy / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    item = json.loads((embedded_copy / "embeddings" / "ids.json").read_text())["items"][1]
    result = CliRunner().invoke(
        cli, [command[0], "--run", str(embedded_copy), *(item if a == "ITEM" else a for a in command[1:])]
    )
    assert result.exit_code == 2, result.output
    one_line(result.stderr, f"{path}: damaged or unreadable")
