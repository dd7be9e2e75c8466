"""Training progress as callbacks: what the stage loop tells a `Progress`, in order, for a run and for its
resumption; `TqdmBars` draws those calls as bars."""

from pathlib import Path

import pytest

import perpeft
from perpeft.engine.runtime.records import EpochRecord
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.train.pipeline import resume_run, train_new_run
from perpeft.engine.train.progress import Progress, RunningLoss, TqdmBars, progress_of


class Recorder(Progress):
    """Every call as a tuple; each epoch's steps counted and the running loss read at each."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.losses: list[float | None] = []

    def stage_started(self, name: str, epochs: int, done: int) -> None:
        self.calls.append(("stage", name, epochs, done))

    def epoch_started(self, name: str, epoch: int, epochs: int, steps: int) -> None:
        self.calls.append(("epoch", name, epoch, epochs, steps))
        self.calls.append(["steps", 0])

    def step(self, running_loss: RunningLoss) -> None:
        self.calls[-1][1] += 1
        self.losses.append(running_loss())

    def epoch_ended(self, record: EpochRecord) -> None:
        self.calls.append(("ended", record))

    def stage_ended(self) -> None:
        self.calls.append(("stage ended",))


class Interrupt(Exception):
    pass


def test_a_run_tells_its_progress_stage_by_stage_and_epoch_by_epoch(small_demo: Path, small_config, tmp_path) -> None:
    progress, lines = Recorder(), []
    config = small_config(small_demo, baseline=False)
    run = perpeft.train(config, tmp_path / "run", progress=progress, on_line=lines.append)  # the public path
    state = RunDirectory.open(run.path).read_state()
    (global_record,), (perpeft_record,) = state.stage("global").history, state.stage("perpeft").history
    steps = [call[1] for call in progress.calls if call[0] == "steps"]
    assert progress.calls == [
        ("stage", "global", 1, 0),
        ("epoch", "global", 1, 1, steps[0]),
        ["steps", steps[0]],
        ("ended", global_record),
        ("stage ended",),
        ("stage", "perpeft", 1, 0),
        ("epoch", "perpeft", 1, 1, steps[1]),
        ["steps", steps[1]],
        ("ended", perpeft_record),
        ("stage ended",),
    ]
    assert all(count > 0 for count in steps)
    assert all(loss is None or loss > 0 for loss in progress.losses)
    assert [line.split(" [")[0].split("  ")[0] for line in lines] == [
        "global epoch 1/1",
        "grouping: 2 groups of sizes",
        "perpeft epoch 1/1",
    ]


def test_a_resumed_stage_starts_at_its_done_epochs(small_demo: Path, small_config, tmp_path) -> None:
    def interrupt_after_epoch_1(line: str) -> None:
        if line.startswith("global epoch 1/2"):
            raise Interrupt(line)

    config = small_config(small_demo, method="global-peft", epochs_global=1, epochs_perpeft=1)
    with pytest.raises(Interrupt):
        train_new_run(config, tmp_path / "run", False, interrupt_after_epoch_1, False)
    progress = Recorder()
    resume_run(tmp_path / "run", lambda line: None, progress)
    assert progress.calls[:2] == [("stage", "global", 2, 1), ("epoch", "global", 2, 2, progress.calls[1][4])]
    assert [call[1].epoch for call in progress.calls if call[0] == "ended"] == [2]


def test_tqdm_bars_draw_the_stage_and_its_epochs_steps_with_the_running_loss(capsys) -> None:
    bars = progress_of(True)
    assert isinstance(bars, TqdmBars) and bars.bars and not progress_of(False).bars
    bars.stage_started("global", 2, 1)
    bars.epoch_started("global", 2, 2, 3)
    for loss in (None, 1.25):
        bars.step(lambda loss=loss: loss)
    assert "2/3" in str(bars._epoch) and "loss=1.2500" in str(bars._epoch)
    bars.step(lambda: 1.0)
    assert bars._epoch is None  # its steps done, the epoch's bar is gone before the epoch is evaluated
    bars.epoch_ended(EpochRecord(2, 1.0, 1.0, 1.0, 0, {}, {}))
    bars.stage_ended()
    drawn = capsys.readouterr().err
    assert "Global PEFT" in drawn and "global epoch 2/2" in drawn
