"""The stage loop every method shares, and the PerPEFT pipeline: Global PEFT → grouping → PerPEFT."""

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perpeft.engine.config.methods import method_of
from perpeft.engine.config.run_config import ResolvedConfig, RunConfig
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.data.sampler import TrainSampler
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.errors import RunError
from perpeft.engine.model.params import large_adapter_config
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import RunInputs, load_run_inputs
from perpeft.engine.runtime.distributed import current_world
from perpeft.engine.runtime.records import STAGE_TITLES, RunMetrics, StageSummary
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_lock import holding_run_lock
from perpeft.engine.runtime.run_state import GroupingRecord
from perpeft.engine.runtime.tensors import load_tensors, save_tensors
from perpeft.engine.train.context import Report, TrainingContext
from perpeft.engine.train.grouping import fit_groups
from perpeft.engine.train.progress import Progress, progress_of
from perpeft.engine.train.reseed import reuse_global_stage, shares_global_stage
from perpeft.engine.train.stages import Stage, StageRunner
from perpeft.engine.train.tensorboard import require_tensorboard


def run_pipeline(
    run: RunDirectory,
    run_inputs: RunInputs,
    report: Report = print,
    progress: bool | Progress = True,
    log_dir: Path | None = None,
) -> RunMetrics:
    """The run's method through the shared stage loop.

    Stage ``global`` (one adapter, C = 1) trains E1+E2 epochs for single-stage methods. Two-stage
    methods (PerPEFT, Group-level) stop it at E1 (or, with ``baseline``, train on to E1+E2 as the fair
    Global PEFT baseline) and group users on the epoch-E1 snapshot; stage ``perpeft`` then trains C
    adapters + projectors (or stage ``grouped`` one adapter + a group embedding) for E2 epochs, warm-started
    from the snapshot.

    Resumable: every epoch ends with an atomic checkpoint and ``state.json``; a rerun on the same
    directory continues where it stopped and reproduces an uninterrupted run's metrics on CPU. With
    ``log_dir`` every epoch's record also goes to TensorBoard (`TensorBoardLog`).
    """
    if not current_world().is_main:  # rank 0 prints and writes; the others train in step with it
        report, progress = silent, False
    context = TrainingContext.build(run, run_inputs, report, progress_of(progress), log_dir)
    global_stage = train_global(context)
    trained = [global_stage.stage]
    if context.method.two_stage:
        if context.state.grouping is None:
            group_users(context, global_stage.model)
        del global_stage  # release the Global PEFT model (and its CLIP copy) before the next stage builds its own
        trained.append(train_second_stage(context).stage)
    return write_metrics(context, trained)


def train_global(context: TrainingContext) -> StageRunner:
    """Stage ``global``: E1+E2 epochs, or E1 for a two-stage method without the baseline; a two-stage
    method's epoch-E1 weights are also saved as the snapshot that grouping and the second stage start from."""
    config, method = context.config, context.method
    e1, e2 = config.epochs_global, config.epochs_perpeft
    users = np.arange(context.run_inputs.dataset.num_users + 1, dtype=np.int64) if method.personal == "user" else None
    stage = Stage(
        "global",
        e1 if method.two_stage and not config.baseline else e1 + e2,
        1,
        context.sampler,
        context.no_groups,
        users,
        snapshot_at=e1 if method.two_stage else None,
    )
    runner = StageRunner.start(context, stage)
    runner.train()
    return runner


def group_users(context: TrainingContext, model: PerpeftModel) -> None:
    """Group the users on ``model`` (the Global stage) loaded with the epoch-E1 snapshot: rank 0 writes the
    grouping, every rank records its sizes in the run's state."""
    config, run, world = context.config, context.run, context.world
    model.load_trainable_state(load_tensors(run.snapshot, model.trainable_shapes())[0])
    assignment, centroids = fit_groups(model, context.split, context.num_items, config)
    if world.is_main:
        save_tensors(run.grouping, {"assignment": torch.from_numpy(assignment), "centroids": centroids})
    sizes = np.bincount(assignment[1:], minlength=config.groups).tolist()
    context.state.grouping = GroupingRecord(sizes, config.grouping, config.clustering)
    context.save_state()
    world.barrier()
    context.report(f"grouping: {config.groups} groups of sizes {sizes}")


def train_second_stage(context: TrainingContext) -> StageRunner:
    """Stage ``perpeft`` (C adapters and projectors, group-homogeneous batches) or ``grouped`` (one adapter
    and a group embedding) for E2 epochs, started from the Global stage's epoch-E1 snapshot."""
    config, run = context.config, context.run
    assignment = run.read_grouping()[0].numpy()
    e1, e2 = config.epochs_global, config.epochs_perpeft
    if context.method.grouped_adapters:
        sampler = TrainSampler(
            context.split.train,
            context.num_items,
            config.maxlen,
            config.batch_size,
            assignment,
            config.group_negatives,
            config.train_windows,
        )
        stage = Stage("perpeft", e2, config.groups, sampler, assignment, epoch_offset=e1)
    else:
        stage = Stage("grouped", e2, 1, context.sampler, context.no_groups, assignment, epoch_offset=e1)
    runner = StageRunner.start(context, stage)
    if not runner.state.completed_epochs:
        runner.model.init_from_single_group(load_tensors(run.snapshot, runner.model.single_group_keys())[0])
    runner.train()
    return runner


def write_metrics(context: TrainingContext, trained: list[Stage]) -> RunMetrics:
    """The finished run's metrics (the last stage is the method's result), written by rank 0 as
    ``metrics.json`` before ``state.json`` marks the run done."""
    config, method, world = context.config, context.method, context.world
    summaries = {stage.name: stage_summary(context, stage) for stage in trained}
    metrics = RunMetrics(
        context.run_inputs.dataset.name,
        config.method,
        config.peft if method.uses_peft else None,
        config.groups,
        config.seed,
        config.global_seed,
        trained[-1].name,
        summaries,
    )
    if world.is_main:
        context.run.write_metrics(metrics)
    context.state.done = True
    context.save_state()
    if context.log is not None:
        context.log.close()
    world.barrier()
    return metrics


def stage_summary(context: TrainingContext, stage: Stage) -> StageSummary:
    """A finished stage's entry in ``metrics.json``: its best epoch and that epoch's metrics; a two-stage
    method's Global stage also names its model (the E1+E2 baseline, or stage 1 alone)."""
    best = context.state.stage(stage.name).best
    if best is None:
        raise RunError(f"{context.run.path}: {STAGE_TITLES[stage.name]} finished without a trained epoch")
    model = None
    if context.method.two_stage and stage.name == "global":
        model = "baseline" if context.config.baseline else "stage1"
    return StageSummary(best.epoch, stage.epochs, best.valid, best.test, model)


def silent(line: str) -> None:
    """A report that prints nothing (ranks other than 0, cells of an experiment grid)."""


def trained_config(config: RunConfig, dataset: Dataset) -> tuple[ResolvedConfig, dict[str, int] | None]:
    """The configuration a run of ``config`` on ``dataset`` trains and writes to its ``config.json``:
    resolved, its modalities those of the catalog it may use, and for Large Global PEFT with LoRA's rank
    grown to PerPEFT's adapter count (the counts returned, else None)."""
    config = config.resolved().for_catalog(dataset.has_text, dataset.has_images, str(dataset.root))
    if method_of(config).large:
        return large_adapter_config(config)
    return config, None


def train_new_run(
    config: RunConfig,
    out: Path,
    overwrite: bool,
    report: Report = print,
    progress: bool | Progress = True,
    global_from: RunDirectory | None = None,
    log_dir: Path | None = None,
) -> tuple[RunDirectory, dict[str, Any]]:
    """Validate the inputs, then create ``out`` (refusing an existing run unless ``overwrite``) and train;
    with ``global_from`` (see `reseeded_config`) the run starts from that run's Global stage and grouping.
    Returns the run and its ``metrics.json``; ``progress`` True draws tqdm bars (`progress_of`)."""
    dataset = run_dataset(config)
    config, counts = trained_config(config, dataset)
    if log_dir is not None:
        require_tensorboard()
    if counts is not None:
        report(
            f"large-global-peft: one LoRA adapter of rank {config.lora_rank} has "
            f"{counts['large_global_peft_adapter']:,} parameters; PerPEFT's {config.groups} adapters "
            f"{counts['perpeft_adapters_total']:,}"
        )
    if global_from is not None and not shares_global_stage(config, global_from.config):
        raise ValueError(f"{global_from.path} trained another Global stage than {config} would: use reseeded_config")
    progress = progress_of(progress)
    run_inputs = load_run_inputs(config, dataset, progress.bars)

    with contextlib.ExitStack() as held:

        def create() -> RunDirectory:
            RunDirectory.check_new(out, overwrite)  # before the lock: a refused directory gets no lock file
            held.enter_context(holding_run_lock(out))
            run = RunDirectory.create(out, config, overwrite)
            if global_from is not None:
                reuse_global_stage(global_from, run)
            return run

        # Rank 0 creates the directory, holding its writer lock, before the other ranks open it.
        run = current_world().main_first(create, lambda: RunDirectory.open(out))
        return run, run_pipeline(run, run_inputs, report, progress, log_dir).to_json()


def resume_run(
    path: Path, report: Report = print, progress: bool | Progress = True, log_dir: Path | None = None
) -> tuple[RunDirectory, dict[str, Any]]:
    """Continue an interrupted run from its newest intact epoch checkpoint (see `StageRunner.resume`);
    returns the run and its ``metrics.json``."""
    run = RunDirectory.open(path)
    config = run.config
    if log_dir is not None:
        require_tensorboard()
    progress = progress_of(progress)
    with holding_run_lock(path):
        run_inputs = load_run_inputs(config, run_dataset(config), progress.bars)
        return run, run_pipeline(run, run_inputs, report, progress, log_dir).to_json()
