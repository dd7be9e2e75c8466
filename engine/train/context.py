"""What every stage of a run reads, built once before the first: `TrainingContext`."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perpeft.engine.config.methods import Method, method_of
from perpeft.engine.config.run_config import ResolvedConfig
from perpeft.engine.data.sampler import TrainSampler
from perpeft.engine.data.split import Split, leave_one_out
from perpeft.engine.eval.evaluation import EvaluationData
from perpeft.engine.model.run_inputs import RunInputs
from perpeft.engine.runtime.device import resolve_device
from perpeft.engine.runtime.distributed import World, current_world
from perpeft.engine.runtime.records import EpochRecord
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_state import RunState
from perpeft.engine.train.progress import Progress
from perpeft.engine.train.tensorboard import TensorBoardLog

Report = Callable[[str], None]


@dataclass(frozen=True)
class TrainingContext:
    """A run being trained: its directory, configuration and method, its data (inputs, split, evaluation
    data, the sampler of ungrouped batches), device and process group, its progress (``state``, updated in
    place and saved by `save_state`), and where it reports: lines, progress callbacks, TensorBoard."""

    run: RunDirectory
    config: ResolvedConfig
    method: Method
    run_inputs: RunInputs
    split: Split
    evaluation: EvaluationData
    sampler: TrainSampler
    device: torch.device
    world: World
    state: RunState
    report: Report
    progress: Progress
    log: TensorBoardLog | None

    @classmethod
    def build(
        cls, run: RunDirectory, run_inputs: RunInputs, report: Report, progress: Progress, log_dir: Path | None
    ) -> "TrainingContext":
        """The context of training ``run`` on ``run_inputs``; ``log_dir`` also logs every epoch to TensorBoard."""
        config = run.config
        dataset = run_inputs.dataset
        device = resolve_device(config.device)
        split = leave_one_out(dataset.sequences)
        evaluation = EvaluationData.build(split, config.maxlen, device)
        state = run.read_state()
        world = current_world()
        log = TensorBoardLog(log_dir) if log_dir is not None and world.is_main else None
        sampler = TrainSampler(
            split.train, dataset.num_items, config.maxlen, config.batch_size, windows=config.train_windows
        )
        return cls(
            run,
            config,
            method_of(config),
            run_inputs,
            split,
            evaluation,
            sampler,
            device,
            world,
            state,
            report,
            progress,
            log,
        )

    @property
    def num_items(self) -> int:
        return self.run_inputs.dataset.num_items

    @property
    def no_groups(self) -> np.ndarray:
        """Every user in group 0 (``[U+1]``): the user groups of a stage with one adapter."""
        return np.zeros(self.run_inputs.dataset.num_users + 1, dtype=np.int64)

    def save_state(self) -> None:
        """Write ``state.json`` (rank 0; the others hold the same state)."""
        if self.world.is_main:
            self.run.write_state(self.state)

    def log_epoch(self, stage: str, step: int, record: EpochRecord) -> None:
        """Log ``record`` to TensorBoard at ``step`` of the run's epoch axis, when a log is kept."""
        if self.log is not None:
            self.log.epoch(stage, step, record)
