"""The stage loop every method shares, and the PerPEFT pipeline: Global PEFT → grouping → PerPEFT."""

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perpeft.engine.config.methods import method_of
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.data.sampler import TrainSampler
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.eval.evaluation import EvaluationData
from perpeft.engine.model.params import large_adapter_config
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import RunInputs, load_run_inputs
from perpeft.engine.runtime.device import compiles_sasrec, resolve_device
from perpeft.engine.runtime.distributed import current_world
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_lock import holding_run_lock
from perpeft.engine.runtime.run_state import GroupingRecord
from perpeft.engine.runtime.tensors import load_tensors, save_tensors
from perpeft.engine.train.grouping import fit_groups
from perpeft.engine.train.reseed import reuse_global_stage, shares_global_stage
from perpeft.engine.train.stages import STAGE_INDEX, Report, StageRunner, seed_torch, stage_summary
from perpeft.engine.train.tensorboard import TensorBoardLog, require_tensorboard


def run_pipeline(
    run: RunDirectory,
    run_inputs: RunInputs,
    report: Report = print,
    progress: bool = True,
    log_dir: Path | None = None,
) -> dict[str, Any]:
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
    config = run.config
    method = method_of(config)
    dataset = run_inputs.dataset
    device = resolve_device(config.device)
    split = leave_one_out(dataset.sequences)
    evaluation = EvaluationData.build(split, config.maxlen, device)
    state = run.read_state()
    world = current_world()
    if not world.is_main:  # rank 0 prints and writes; the others train in step with it
        report, progress = silent, False

    def save_state() -> None:
        if world.is_main:
            run.write_state(state)

    log = TensorBoardLog(log_dir) if log_dir is not None and world.is_main else None

    def logged(stage: str, offset: int) -> Callable[[int, dict[str, Any]], None]:
        """An epoch hook that logs the stage's records to TensorBoard at ``offset + epoch``."""

        def hook(epoch: int, record: dict[str, Any]) -> None:
            if log is not None:
                log.epoch(stage, offset + epoch, record)

        return hook

    e1, e2 = config.epochs_global, config.epochs_perpeft
    global_epochs = e1 if method.two_stage and not config.baseline else e1 + e2
    no_groups = np.zeros(dataset.num_users + 1, dtype=np.int64)

    def stage(
        name: str,
        epochs: int,
        groups: int,
        sampler: TrainSampler,
        user_groups: np.ndarray,
        personal: np.ndarray | None = None,
    ) -> StageRunner:
        seed_torch([config.stage_seed(name), STAGE_INDEX[name], 0])
        personal_index = None if personal is None else torch.from_numpy(personal)
        model = PerpeftModel(
            config, run_inputs.make_encoder, run_inputs.inputs, dataset.num_items, groups, personal_index
        ).to(device)
        if compiles_sasrec(config.compile, device):
            model.recommender.sasrec.compile()  # in place: parameter names (checkpoints) are unchanged
        runner = StageRunner(
            name, run, config, model, sampler, evaluation, user_groups, dataset.num_items, device, report, progress
        )
        runner.resume(state.stage(name), epochs)
        return runner

    plain_sampler = TrainSampler(
        split.train, dataset.num_items, config.maxlen, config.batch_size, windows=config.train_windows
    )
    users = np.arange(dataset.num_users + 1, dtype=np.int64) if method.personal == "user" else None
    global_stage = stage("global", global_epochs, 1, plain_sampler, no_groups, users)

    log_global = logged("global", 0)

    def save_snapshot(epoch: int, record: dict[str, Any]) -> None:
        log_global(epoch, record)
        if method.two_stage and epoch == e1:
            save_tensors(run.snapshot, global_stage.model.trainable_state(), {"epoch": epoch})

    global_stage.train(global_epochs, state.stage("global"), save_state, save_snapshot)
    stages = {"global": global_epochs}

    if method.two_stage:
        if state.grouping is None:
            global_stage.model.load_trainable_state(
                load_tensors(run.snapshot, global_stage.model.trainable_shapes())[0]
            )
            assignment, centroids = fit_groups(global_stage.model, split, dataset.num_items, config)
            if world.is_main:
                grouping = {"assignment": torch.from_numpy(assignment), "centroids": centroids}
                save_tensors(run.grouping, grouping)
            sizes = np.bincount(assignment[1:], minlength=config.groups).tolist()
            state.grouping = GroupingRecord(sizes, config.grouping, config.clustering)
            save_state()
            world.barrier()
            report(f"grouping: {config.groups} groups of sizes {sizes}")
        global_stage = None  # release the Global PEFT model (and its CLIP copy) before the next stage builds its own
        assignment = run.read_grouping()[0].numpy()
        if method.grouped_adapters:
            name = "perpeft"
            sampler = TrainSampler(
                split.train,
                dataset.num_items,
                config.maxlen,
                config.batch_size,
                assignment,
                config.group_negatives,
                config.train_windows,
            )
            second = stage(name, e2, config.groups, sampler, assignment)
        else:
            name = "grouped"
            second = stage(name, e2, 1, plain_sampler, no_groups, assignment)
        if not state.stage(name).completed_epochs:
            second.model.init_from_single_group(load_tensors(run.snapshot, second.model.single_group_keys())[0])
        second.train(e2, state.stage(name), save_state, logged(name, e1))
        stages[name] = e2

    metrics = {
        "dataset": dataset.name,
        "method": config.method,
        "peft": config.peft if method.uses_peft else None,
        "groups": config.groups,
        "seed": config.seed,
        **({"global_seed": config.global_seed} if config.global_seed is not None else {}),
        "result": list(stages)[-1],
        **{name: stage_summary(state.stage(name), epochs) for name, epochs in stages.items()},
    }
    if method.two_stage:
        metrics["global"]["model"] = "baseline" if config.baseline else "stage1"
    if world.is_main:
        run.write_metrics(metrics)
    state.done = True
    save_state()
    if log is not None:
        log.close()
    world.barrier()
    return metrics


def silent(line: str) -> None:
    """A report that prints nothing (ranks other than 0, cells of an experiment grid)."""


def trained_config(config: RunConfig, dataset: Dataset) -> tuple[RunConfig, dict[str, int] | None]:
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
    progress: bool = True,
    global_from: RunDirectory | None = None,
    log_dir: Path | None = None,
) -> tuple[RunDirectory, dict[str, Any]]:
    """Validate the inputs, then create ``out`` (refusing an existing run unless ``overwrite``) and train;
    with ``global_from`` (see `reseeded_config`) the run starts from that run's Global stage and grouping."""
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
    run_inputs = load_run_inputs(config, dataset, progress)

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
        return run, run_pipeline(run, run_inputs, report, progress, log_dir)


def resume_run(
    path: Path, report: Report = print, progress: bool = True, log_dir: Path | None = None
) -> tuple[RunDirectory, dict[str, Any]]:
    """Continue an interrupted run from its newest intact epoch checkpoint (see `StageRunner.resume`)."""
    run = RunDirectory.open(path)
    config = run.config
    if log_dir is not None:
        require_tensorboard()
    with holding_run_lock(path):
        run_inputs = load_run_inputs(config, run_dataset(config), progress)
        return run, run_pipeline(run, run_inputs, report, progress, log_dir)
