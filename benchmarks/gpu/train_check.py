"""One Global PEFT and one PerPEFT training epoch at Arts scale, random ViT-B/32, bf16 autocast.

The engine's own pieces: `StageRunner` (its optimizer and trainer), the epoch's batches from
`TrainSampler` (paper batch of 16 users; PerPEFT: group-homogeneous batches, group negatives), steps
through `train_epoch`, and `fit_groups` (K-Means on the Global model's user vectors) in between. Arts
scale is 24,511 users (about 1,530 steps per epoch) and 18,884 items with synthetic in-memory inputs.

A full epoch may not fit the check's budget: after ``--warmup-steps`` steps (Triton compiles, cuBLAS and
allocator warm up) each stage trains in chunks until ``--stage-seconds`` have passed or the epoch ends.
A stage that stopped early reports its steady-state seconds per step and the epoch *extrapolated* from
them (warm-up time + remaining steps x steady s/step), and says so; per-epoch evaluation is not run.
SASRec is not compiled (``--compile off``): its first compile would dominate a timed stretch.

Run: ``python -m benchmarks.gpu.train_check --out train.json`` (CUDA) or ``--smoke`` (CPU, seconds).
"""

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from perpeft.engine.data.sampler import Batch, TrainSampler
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import RunInputs, clip_encoder_factory
from perpeft.engine.runtime.memory import PeakMemory
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.train.context import TrainingContext
from perpeft.engine.train.grouping import fit_groups
from perpeft.engine.train.pipeline import silent
from perpeft.engine.train.progress import Progress
from perpeft.engine.train.stages import STAGE_INDEX, Stage, StageRunner, seed_torch, train_epoch

from .common import (
    ARTS,
    PEAK_NOTE,
    SMOKE,
    Figures,
    TimedInputs,
    check_config,
    check_device,
    random_clip,
    step_arguments,
    stopwatch,
    synchronize,
    synthetic_dataset,
    synthetic_inputs,
)

CHUNK_STEPS = 25  # steps per train_epoch call while the stage budget lasts


def distinct_items(batches: list[Batch]) -> float:
    """Mean number of distinct items (CLIP passes) per step: what a step's cost scales with."""
    return float(np.mean([len(np.unique(np.stack([b.seq, b.pos, b.neg]))) for b in batches])) if batches else 0.0


def timed_epoch(runner: StageRunner, batches: list[Batch], warmup: int, budget_s: float) -> dict[str, Any]:
    """Warm-up steps, then chunks of steps until ``budget_s`` or the epoch ends; timings and the loss."""
    device = runner.context.device
    warmup = min(warmup, len(batches))
    with PeakMemory(device) as peak:
        with stopwatch() as warm:
            losses = [train_epoch(runner.trainer, runner.optimizer, batches[:warmup], device, Progress()).loss]
            synchronize(device)
        done = warmup
        started = time.perf_counter()
        with stopwatch() as steady:
            while done < len(batches) and time.perf_counter() - started < budget_s:
                chunk = batches[done : done + CHUNK_STEPS]
                losses.append(train_epoch(runner.trainer, runner.optimizer, chunk, device, Progress()).loss)
                done += len(chunk)
            synchronize(device)
    timed_steps = done - warmup
    per_step = steady["seconds"] / timed_steps if timed_steps else float("nan")
    full = done == len(batches)
    return {
        "steps_total": len(batches),
        "steps_run": done,
        "warmup_steps": warmup,
        "warmup_s": warm["seconds"],
        "timed_steps": timed_steps,
        "timed_s": steady["seconds"],
        "s_per_step": per_step,
        "full_epoch": full,
        "epoch_s": warm["seconds"] + (steady["seconds"] if full else per_step * (len(batches) - warmup)),
        "distinct_items_per_step": distinct_items(batches[:done]),
        "last_loss": losses[-1],
        "peak_bytes": peak.bytes,
        "finite": bool(np.isfinite(losses).all()),
    }


def report_stage(figures: Figures, title: str, result: dict[str, Any], inputs: TimedInputs) -> None:
    """One stage's figures: epoch seconds (measured or extrapolated, said which), step, input time, memory."""
    if result["full_epoch"]:
        kind = "measured (full epoch)"
    else:
        kind = f"EXTRAPOLATED from {result['timed_steps']} timed steps of {result['steps_total']}"
    figures.add(
        f"{title} epoch",
        result["epoch_s"],
        "s",
        f"{kind}; {result['warmup_steps']} warm-up steps {result['warmup_s']:.1f} s",
    )
    figures.add(
        f"{title} steady step",
        result["s_per_step"] * 1e3,
        "ms",
        f"{result['distinct_items_per_step']:.0f} distinct items per step",
    )
    figures.add(f"{title} host time in ItemInputs.batch per step", inputs.seconds / max(inputs.calls, 1) * 1e3, "ms")
    figures.add(f"{title} peak memory", result["peak_bytes"] / 2**30, "GiB", PEAK_NOTE)
    figures.details[title] = result
    if not result["finite"]:
        figures.fail(f"{title}: non-finite loss {result['last_loss']}")


def build_runner(
    context: TrainingContext, name: str, model: PerpeftModel, sampler: TrainSampler, user_groups: np.ndarray
) -> StageRunner:
    """The engine's stage runner (optimizer, DDP-or-not trainer) of ``model``; the context's evaluation data
    is built but unused."""
    stage = Stage(name, 1, model.groups, sampler, user_groups)
    return StageRunner(context=context, stage=stage, model=model)


def main(argv: list[str] | None = None) -> int:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="Users per batch (paper: 16).")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--stage-seconds", type=float, default=30.0, help="Timed seconds per stage after warm-up.")
    args = parser.parse_args(argv)
    device = check_device(args.smoke)
    scale = SMOKE if args.smoke else ARTS
    figures = Figures("train", device, args.smoke, args.out)
    with stopwatch() as setup:
        bundle = random_clip(args.smoke)
        dataset = synthetic_dataset(scale)
        inputs = TimedInputs.of(synthetic_inputs(bundle, scale.items, scale.title_chars))
        config = check_config(device, args.groups, batch_size=args.batch_size)
        split = leave_one_out(dataset.sequences)
        make_encoder = clip_encoder_factory(config, bundle)
        work = Path(tempfile.mkdtemp(prefix="perpeft-train-check-"))
        run = RunDirectory.create(work / "run", config, overwrite=True)
        context = TrainingContext.build(run, RunInputs(dataset, make_encoder, inputs), silent, Progress(), None)
    figures.details.update(
        users=scale.users, items=scale.items, groups=args.groups, batch_size=args.batch_size, setup_s=setup["seconds"]
    )

    no_groups = np.zeros(dataset.num_users + 1, dtype=np.int64)
    seed_torch([config.seed, STAGE_INDEX["global"], 0])
    model = PerpeftModel(config, make_encoder, inputs, scale.items, 1).to(device)
    sampler = TrainSampler(split.train, scale.items, config.maxlen, config.batch_size)
    runner = build_runner(context, "global", model, sampler, no_groups)
    seed = [config.seed, STAGE_INDEX["global"], 1]
    seed_torch(seed)
    inputs.reset()
    result = timed_epoch(runner, sampler.epoch(np.random.default_rng(seed)), args.warmup_steps, args.stage_seconds)
    report_stage(figures, "Global PEFT", result, inputs)

    with stopwatch() as grouping:
        assignment, _ = fit_groups(model, split, scale.items, config)
        synchronize(device)
    sizes = np.bincount(assignment[1:], minlength=args.groups).tolist()
    figures.add("grouping (user vectors + K-Means)", grouping["seconds"], "s", f"group sizes {sizes}")

    snapshot = {name: tensor.detach().clone() for name, tensor in model.trainable_state().items()}
    del runner, model
    seed_torch([config.seed, STAGE_INDEX["perpeft"], 0])
    model = PerpeftModel(config, make_encoder, inputs, scale.items, args.groups).to(device)
    model.init_from_single_group(snapshot)
    sampler = TrainSampler(split.train, scale.items, config.maxlen, config.batch_size, assignment, True)
    runner = build_runner(context, "perpeft", model, sampler, assignment)
    seed = [config.seed, STAGE_INDEX["perpeft"], 1]
    seed_torch(seed)
    inputs.reset()
    result = timed_epoch(runner, sampler.epoch(np.random.default_rng(seed)), args.warmup_steps, args.stage_seconds)
    report_stage(figures, f"PerPEFT (C = {args.groups})", result, inputs)
    return figures.finish()


if __name__ == "__main__":
    raise SystemExit(main())
