"""One training stage, epoch by epoch: seeding, batches dealt over ranks, evaluation, best-epoch selection and checkpoints."""

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sampler import Batch, TrainSampler
from perpeft.engine.errors import InputError, RunError
from perpeft.engine.eval.evaluation import evaluate_model
from perpeft.engine.eval.metrics import SELECTION_METRIC
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime.device import compiles_sasrec
from perpeft.engine.runtime.distributed import World, current_world
from perpeft.engine.runtime.memory import PeakMemory
from perpeft.engine.runtime.records import STAGE_TITLES, BestRecord, EpochRecord
from perpeft.engine.runtime.tensors import load_tensors, optimizer_tensors, restore_optimizer, save_tensors
from perpeft.engine.train.context import TrainingContext
from perpeft.engine.train.optimizer import FlatAdamW
from perpeft.engine.train.progress import Progress

STAGE_INDEX = {"global": 1, "perpeft": 2, "grouped": 2}  # a stage's place in its seed key
# Epoch checkpoints kept per stage: the newest, and the one before it to resume from if the newest is damaged.
KEPT_CHECKPOINTS = 2
log = logging.getLogger(__name__)

# torch ≥ 2.13 renamed DDP's broadcast_buffers (and deprecated the old name).
BUFFERS_NOT_SYNCED_PER_STEP: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def seed_torch(key: list[int]) -> None:
    """Seed torch's RNG from a (run seed, stage, epoch) key, so every epoch's randomness is reproducible
    on its own and a resumed run draws exactly what an uninterrupted one would. Ranks after the first
    append their rank to the key (their dropout differs); rank 0 draws what a single process draws."""
    rank = current_world().rank
    torch.manual_seed(int(np.random.SeedSequence([*key, rank] if rank else key).generate_state(1)[0]))


def rank_batches(batches: list[Batch], world: World) -> list[Batch]:
    """This rank's share of an epoch's batches: dealt round-robin, so in one step each rank trains on a
    different batch (of any group); the list wraps around so every rank takes the same number of steps."""
    if world.size == 1:
        return batches
    rounds = -(-len(batches) // world.size)
    dealt = [batches[index % len(batches)] for index in range(rounds * world.size)]
    return dealt[world.rank :: world.size]


@dataclass(frozen=True)
class EpochResult:
    """One epoch's training: the mean loss over every rank's steps and, if training diverged, the first step
    (1-based, on any rank) whose loss was not finite."""

    loss: float
    diverged_at: int | None


class LossTally:
    """An epoch's losses, summed on the device without a host sync per step.

    The first non-finite loss is noted on the device too. A progress bar reads a host copy of the sum
    that each step starts without waiting (pinned memory on CUDA) and that is read only once it has landed,
    so the shown mean may trail by a step or two; `result` reads both at the end of the epoch.
    """

    def __init__(self, device: torch.device, steps: int) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.never = steps + 1
        self.first_bad = torch.full((), self.never, dtype=torch.int64, device=device)
        self.steps = 0
        cuda = device.type == "cuda"
        self._copy = torch.zeros(1, dtype=torch.float64, pin_memory=cuda)
        self._landed = torch.cuda.Event() if cuda else None
        self._copied_steps = 0
        self._shown: float | None = None

    def add(self, loss: torch.Tensor) -> None:
        self.steps += 1
        loss = loss.detach()
        self.total += loss
        self.first_bad = torch.minimum(self.first_bad, torch.where(torch.isfinite(loss), self.never, self.steps))

    def running_mean(self) -> float | None:
        """The mean loss as of the last copy that has landed (None before the first), and a new copy started."""
        if self._landed is None or self._landed.query():
            if self._copied_steps:
                # Read through NumPy: the host copy is final, and no tensor op is dispatched for it.
                self._shown = float(self._copy.numpy()[0]) / self._copied_steps
            self._copy.copy_(self.total.view(1), non_blocking=True)
            if self._landed is not None:
                self._landed.record()
            self._copied_steps = self.steps
        return self._shown

    def result(self, world: World) -> EpochResult:
        """The mean over every rank's steps and the first diverged step: one read of the device, at the end."""
        sums = world.sum(torch.stack([self.total.cpu(), torch.tensor(float(self.steps), dtype=torch.float64)]))
        first = int(world.gather_rows(self.first_bad.cpu().view(1)).min())
        return EpochResult(float(sums[0] / sums[1].clamp(min=1)), first if first < self.never else None)


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], device: torch.device, progress: Progress
) -> EpochResult:
    """One pass over ``batches``; ``model`` is the PerpeftModel or its DistributedDataParallel wrapper
    (whose call all-reduces the gradients). No step waits for the device (`LossTally`)."""
    model.train()
    tally = LossTally(device, len(batches))
    for batch in batches:
        loss = model(batch, device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tally.add(loss)
        progress.step(tally.running_mean)
    return tally.result(current_world())


def parameter_groups(model: PerpeftModel, config: RunConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: every trainable parameter at ``lr``, or with ``id_lr`` the ID
    embeddings in a group of their own at that rate. The multimodal term 0.5·MLP_g(m) starts ~15× the
    norm of the xavier-initialised ID embeddings (``state.json`` norms), so at one rate the IDs barely
    move when CLIP's features say little about the items."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.id_lr is None:
        return [{"params": trainable}]
    ids = model.recommender.item_embeddings.weight
    rest = [parameter for parameter in trainable if parameter is not ids]
    return [{"params": rest}, {"params": [ids], "lr": config.id_lr}]


@dataclass(frozen=True)
class Stage:
    """One training stage of a run: its name, epochs and adapter count C, the sampler of its batches, each
    user's group in evaluation, the personal index of methods with a learned user or group embedding, where
    its epoch 1 lies on the run's epoch axis (TensorBoard), and the epoch whose weights are saved as the
    snapshot a second stage starts from."""

    name: str
    epochs: int
    groups: int
    sampler: TrainSampler
    user_groups: np.ndarray
    personal: np.ndarray | None = None
    epoch_offset: int = 0
    snapshot_at: int | None = None


class StageRunner:
    """Trains one stage epoch by epoch with per-epoch evaluation, best-epoch selection and checkpoints;
    ``state`` is the stage's progress in the run's `RunState`, updated after every epoch."""

    def __init__(self, *, context: TrainingContext, stage: Stage, model: PerpeftModel) -> None:
        self.context, self.stage, self.model = context, stage, model
        self.name = stage.name
        self.state = context.state.stage(stage.name)
        config = context.config
        self.optimizer = FlatAdamW(parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
        self.trainer: nn.Module = model
        if context.world.joined:
            # Every rank holds all C groups stacked in one tensor per layer, so every parameter gets a
            # gradient in every step (zeros for the groups absent from a rank's batch): no unused-parameter
            # search. Buffers (frozen features, personal index) are identical by construction.
            self.trainer = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[torch.cuda.current_device()] if context.device.type == "cuda" else None,
                **BUFFERS_NOT_SYNCED_PER_STEP,
            )

    @classmethod
    def start(cls, context: TrainingContext, stage: Stage) -> "StageRunner":
        """The stage's model built from its seed, and its runner resumed where the run's checkpoints stop."""
        config, inputs = context.config, context.run_inputs
        seed_torch([config.stage_seed(stage.name), STAGE_INDEX[stage.name], 0])
        personal = None if stage.personal is None else torch.from_numpy(stage.personal)
        model = PerpeftModel(config, inputs.make_encoder, inputs.inputs, context.num_items, stage.groups, personal).to(
            context.device
        )
        if compiles_sasrec(config.compile, context.device):
            model.recommender.sasrec.compile()  # in place: parameter names (checkpoints) are unchanged
        runner = cls(context=context, stage=stage, model=model)
        runner.resume()
        return runner

    def resume(self) -> None:
        """Load model and optimizer from the newest intact checkpoint of a stage that has epochs left (a
        finished stage needs none of its epoch checkpoints).

        The newest checkpoint damaged (cut short, not safetensors, not this model's) falls back to the one
        before it, which is kept for this: the stage's progress is rolled back to that epoch and a warning
        says so. With none intact, or with ``best.safetensors`` damaged and its epoch's weights in no
        checkpoint, the run cannot resume: InputError naming the file.
        """
        progress, run = self.state, self.context.run
        completed = progress.completed_epochs
        if not completed or completed >= self.stage.epochs:
            return
        shapes = self.model.trainable_shapes()
        damage: InputError | None = None
        for epoch in range(completed, max(completed - KEPT_CHECKPOINTS, 0), -1):
            try:
                tensors, metadata = load_tensors(run.checkpoint(self.name, epoch), shapes)
                break
            except InputError as error:
                damage = damage or error
        else:
            raise InputError(
                f"{damage}; no earlier checkpoint of this stage is intact: start the run again with --overwrite"
            )
        kept = self._best_epoch(shapes)
        if epoch < completed:
            if self.context.world.is_main:
                log.warning(
                    "warning: %s; %s resumes from epoch %d, whose checkpoint is intact", damage, self.name, epoch
                )
            progress.best = _best_of(progress.history, kept, epoch)
            progress.history = progress.history[:epoch]
            progress.completed_epochs = epoch
        self._restore_best(kept, epoch, tensors, shapes)
        self.model.load_trainable_state(tensors)
        restore_optimizer(self.optimizer, tensors, metadata["param_groups"])

    def _best_epoch(self, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The epoch whose weights ``best.safetensors`` holds; None when it is missing or damaged."""
        try:
            return int(load_tensors(self.context.run.best(self.name), shapes)[1]["epoch"])
        except (InputError, KeyError, TypeError, ValueError):
            return None

    def _restore_best(
        self, kept: int | None, epoch: int, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        """Make ``best.safetensors`` (now holding epoch ``kept``, None when damaged) hold the weights of the
        stage's best epoch again: rewritten from the resumed checkpoint when that is the best epoch, else
        refused."""
        best = self.state.best
        if best is None or kept == best.epoch:
            return
        path = self.context.run.best(self.name)
        if best.epoch != epoch:
            raise InputError(
                f"{path}: missing or damaged, and the weights of its epoch ({best.epoch}) are in no checkpoint: "
                "start the run again with --overwrite"
            )
        if self.context.world.is_main:
            log.warning("warning: %s: missing or damaged; rewritten from the checkpoint of epoch %d", path, epoch)
            save_tensors(path, {name: tensors[name] for name in shapes}, {"epoch": epoch})

    def train(self) -> None:
        """Train epochs ``completed+1 .. epochs``: each draws its batches, trains, is checked finite,
        evaluated, recorded in the stage's progress, saved (rank 0) and reported."""
        progress, world = self.context.progress, self.context.world
        epochs = self.stage.epochs
        progress.stage_started(self.name, epochs, self.state.completed_epochs)
        for epoch in range(self.state.completed_epochs + 1, epochs + 1):
            started = time.perf_counter()
            batches = self._draw_batches(epoch)
            progress.epoch_started(self.name, epoch, epochs, len(batches))
            with PeakMemory(self.context.device) as peak:
                result = train_epoch(self.trainer, self.optimizer, batches, self.context.device, progress)
            self._check_finite(result, epoch, len(batches))
            record = self._evaluate(epoch, result.loss, started, time.perf_counter() - started, peak.bytes)
            improved = self._record(record)
            if world.is_main:  # ranks hold identical weights; one writes
                self._publish(record)
                self._checkpoint(epoch, improved)
            world.barrier()
            self._report(record, improved)
            progress.epoch_ended(record)
        progress.stage_ended()

    def _draw_batches(self, epoch: int) -> list[Batch]:
        """Seed the epoch and draw its batches: the same on every rank (same seed), dealt round-robin."""
        seed = [self.context.config.stage_seed(self.name), STAGE_INDEX[self.name], epoch]
        seed_torch(seed)
        return rank_batches(self.stage.sampler.epoch(np.random.default_rng(seed)), self.context.world)

    def _check_finite(self, result: EpochResult, epoch: int, steps: int) -> None:
        """RunError, before anything of ``epoch`` is evaluated or saved, when its loss or the trained weights
        stopped being finite: the stage ends there and its last checkpoint stays."""
        if result.diverged_at is not None:
            where = f"step {result.diverged_at} of {steps}: the loss is not finite"
        elif not all(bool(torch.isfinite(parameter).all()) for parameter in self.model.trainable_state().values()):
            where = f"its last step ({steps}): the weights are not finite"
        else:
            return
        config = self.context.config
        rates = f"--lr {config.lr:g}" + (f", --id-lr {config.id_lr:g}" if config.id_lr is not None else "")
        kept = f"epoch {epoch - 1}'s checkpoint is kept" if epoch > 1 else "no epoch of it was saved"
        raise RunError(
            f"{self.context.run.path}: training diverged in {STAGE_TITLES[self.name]}, epoch {epoch}, at {where}; "
            f"{kept}: train again with a lower learning rate (this run: {rates})"
        )

    def _evaluate(self, epoch: int, loss: float, started: float, trained: float, peak_bytes: int) -> EpochRecord:
        """The epoch's record: its training figures and the model's validation and test metrics."""
        context = self.context
        metrics = evaluate_model(
            self.model, context.evaluation, self.stage.user_groups, context.num_items, context.config
        )
        seconds = time.perf_counter() - started
        return EpochRecord(
            epoch, loss, seconds, trained, peak_bytes, metrics["valid"], metrics["test"], metrics["norms"]
        )

    def _record(self, record: EpochRecord) -> bool:
        """Add ``record`` to the stage's progress; whether its epoch is the best so far by validation."""
        progress = self.state
        progress.history.append(record)
        best = progress.best
        improved = best is None or record.valid[SELECTION_METRIC] > best.valid[SELECTION_METRIC]
        if improved:
            progress.best = BestRecord.of(record)
        progress.completed_epochs = record.epoch
        return improved

    def _publish(self, record: EpochRecord) -> None:
        """Log the epoch to TensorBoard and, at the stage's snapshot epoch, save the snapshot."""
        self.context.log_epoch(self.name, self.stage.epoch_offset + record.epoch, record)
        if record.epoch == self.stage.snapshot_at:
            save_tensors(self.context.run.snapshot, self.model.trainable_state(), {"epoch": record.epoch})

    def _checkpoint(self, epoch: int, improved: bool) -> None:
        """Save the epoch's checkpoint, then ``state.json``, then (when improved) the best weights, and drop
        the checkpoint that is no longer kept. In this order, wherever a crash falls, `resume` finds the
        weights of the state's best epoch (in best.safetensors, or in the newest checkpoint)."""
        run = self.context.run
        tensors, param_groups = optimizer_tensors(self.optimizer)
        save_tensors(
            run.checkpoint(self.name, epoch),
            {**self.model.trainable_state(), **tensors},
            {"epoch": epoch, "param_groups": param_groups},
        )
        self.context.save_state()
        if improved:
            save_tensors(run.best(self.name), self.model.trainable_state(), {"epoch": epoch})
        if epoch > KEPT_CHECKPOINTS:
            run.checkpoint(self.name, epoch - KEPT_CHECKPOINTS).unlink(missing_ok=True)

    def _report(self, record: EpochRecord, improved: bool) -> None:
        self.context.report(
            f"{self.name} epoch {record.epoch}/{self.stage.epochs}  loss {record.loss:.4f}  "
            f"valid {SELECTION_METRIC} {record.valid[SELECTION_METRIC]:.4f}  "
            f"test NDCG@20 {record.test['NDCG@20']:.4f}{'  *' if improved else ''}"
        )


def _best_of(history: list[EpochRecord], kept: int | None, epoch: int) -> BestRecord | None:
    """The best record once ``history`` is cut back to ``epoch``: the one ``best.safetensors`` holds (``kept``)
    where that file is intact, even from a later epoch (its weights are on disk), else the best of the
    remaining epochs by validation, the earliest among equals (as training selects)."""
    records = {record.epoch: record for record in history}
    if kept is not None and kept in records:
        return BestRecord.of(records[kept])
    remaining = history[:epoch]
    if not remaining:
        return None
    chosen = remaining[0]
    for record in remaining[1:]:
        if record.valid[SELECTION_METRIC] > chosen.valid[SELECTION_METRIC]:
            chosen = record
    return BestRecord.of(chosen)
