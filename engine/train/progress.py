"""Training progress as callbacks: the stage loop tells a `Progress` where it is, rank 0 only. `Progress`
itself shows nothing; `TqdmBars` draws the tqdm bars of the CLI and of the API's ``progress=True``."""

from collections.abc import Callable

from tqdm.auto import tqdm

from perpeft.engine.runtime.records import STAGE_TITLES, EpochRecord

RunningLoss = Callable[[], float | None]


class Progress:
    """Callbacks of a run's training, in the order a stage calls them; every one does nothing here."""

    bars = False  # whether the run's other steps (item inputs, frozen CLIP features) may draw tqdm bars too

    def stage_started(self, name: str, epochs: int, done: int) -> None:
        """Stage ``name`` trains up to ``epochs`` epochs; ``done`` of them were trained before (a resumed run)."""

    def epoch_started(self, name: str, epoch: int, epochs: int, steps: int) -> None:
        """Epoch ``epoch`` of ``epochs`` starts: ``steps`` optimizer steps on this rank."""

    def step(self, running_loss: RunningLoss) -> None:
        """One optimizer step done. ``running_loss()`` is the epoch's mean loss a step or two behind (None
        before the first has landed), read without waiting for the device; call it only to show it."""

    def epoch_ended(self, record: EpochRecord) -> None:
        """The epoch is trained, evaluated, saved and reported: ``record`` is its ``state.json`` record."""

    def stage_ended(self) -> None:
        """The stage trained its last epoch."""


class TqdmBars(Progress):
    """A stage bar (epochs, with the time left) over a bar of the current epoch's steps and its running
    loss; both vanish when done (notebook-aware, through ``tqdm.auto``)."""

    bars = True

    def __init__(self) -> None:
        self._stage: tqdm | None = None
        self._epoch: tqdm | None = None

    def stage_started(self, name: str, epochs: int, done: int) -> None:
        self._stage = tqdm(
            total=epochs, initial=done, desc=STAGE_TITLES[name], unit="epoch", leave=False, dynamic_ncols=True
        )

    def epoch_started(self, name: str, epoch: int, epochs: int, steps: int) -> None:
        self._epoch = tqdm(
            total=steps, desc=f"{name} epoch {epoch}/{epochs}", unit="batch", leave=False, dynamic_ncols=True
        )

    def step(self, running_loss: RunningLoss) -> None:
        bar = self._epoch
        if bar is None:
            return
        mean = running_loss()
        if mean is not None:
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
        bar.update(1)
        if bar.n >= bar.total:  # the steps are done: the bar goes before the epoch is evaluated
            self._close_epoch()

    def epoch_ended(self, record: EpochRecord) -> None:
        self._close_epoch()
        if self._stage is not None:
            self._stage.update(1)

    def stage_ended(self) -> None:
        if self._stage is not None:
            self._stage.close()
            self._stage = None

    def _close_epoch(self) -> None:
        if self._epoch is not None:
            self._epoch.close()
            self._epoch = None


def progress_of(progress: bool | Progress) -> Progress:
    """``progress`` as callbacks: True is `TqdmBars`, False shows nothing."""
    if isinstance(progress, Progress):
        return progress
    return TqdmBars() if progress else Progress()
