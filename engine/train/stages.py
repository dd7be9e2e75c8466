"""One training stage, epoch by epoch: seeding, batches dealt over ranks, evaluation, best-epoch selection and checkpoints."""

import inspect
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sampler import Batch, TrainSampler
from perpeft.engine.eval.evaluation import EvaluationData, evaluate_model
from perpeft.engine.eval.metrics import SELECTION_METRIC
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime.distributed import World, current_world
from perpeft.engine.runtime.memory import PeakMemory
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_state import STAGE_TITLES, StageProgress
from perpeft.engine.runtime.tensors import load_tensors, optimizer_tensors, restore_optimizer, save_tensors

STAGE_INDEX = {"global": 1, "perpeft": 2, "grouped": 2}  # a stage's place in its seed key


Report = Callable[[str], None]


# torch ≥ 2.13 renamed DDP's broadcast_buffers (and deprecated the old name).
BUFFERS_NOT_SYNCED_PER_STEP = (
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


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    device: torch.device,
    description: str,
    progress: bool,
) -> float:
    """One pass over ``batches``; ``model`` is the PerpeftModel or its DistributedDataParallel wrapper
    (whose call all-reduces the gradients). Returns the mean loss over every rank's steps."""
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False, dynamic_ncols=True)
    for steps, batch in enumerate(bar, start=1):
        loss = model(batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if progress:
            bar.set_postfix(loss=f"{float(total) / steps:.4f}")
    sums = current_world().sum(torch.stack([total.cpu(), torch.tensor(float(len(batches)), dtype=torch.float64)]))
    return float(sums[0] / sums[1].clamp(min=1))


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


class StageRunner:
    """Trains one stage epoch by epoch with per-epoch evaluation, best-epoch selection and checkpoints."""

    def __init__(
        self,
        name: str,
        run: RunDirectory,
        config: RunConfig,
        model: PerpeftModel,
        sampler: TrainSampler,
        evaluation: EvaluationData,
        user_groups: np.ndarray,
        num_items: int,
        device: torch.device,
        report: Report,
        progress: bool,
    ) -> None:
        self.name, self.run, self.config, self.model = name, run, config, model
        self.sampler, self.evaluation, self.user_groups = sampler, evaluation, user_groups
        self.num_items, self.device, self.report, self.progress = num_items, device, report, progress
        self.optimizer = torch.optim.AdamW(
            parameter_groups(model, config),
            lr=config.lr,
            weight_decay=config.weight_decay,
            # One kernel per parameter instead of ~10 ops each (CPU and CUDA): 0.7 vs 3.0 ms per step at
            # the speed benchmark's ~60 tensors on CPU.
            fused=True,
        )
        self.world = current_world()
        self.trainer: nn.Module = model
        if self.world.joined:
            # Every rank holds all C groups stacked in one tensor per layer, so every parameter gets a
            # gradient in every step (zeros for the groups absent from a rank's batch): no unused-parameter
            # search. Buffers (frozen features, personal index) are identical by construction.
            self.trainer = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
                **BUFFERS_NOT_SYNCED_PER_STEP,
            )

    def resume(self, progress: StageProgress) -> None:
        """Load model and optimizer from the stage's last completed epoch."""
        completed = progress.completed_epochs
        if completed:
            tensors, metadata = load_tensors(self.run.checkpoint(self.name, completed))
            self.model.load_trainable_state(tensors)
            restore_optimizer(self.optimizer, tensors, metadata["param_groups"])

    def train(
        self,
        epochs: int,
        progress: StageProgress,
        save_state: Callable[[], None],
        on_epoch: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Run epochs ``completed+1 .. epochs``, updating ``progress`` (history, best) after each; rank 0
        calls ``on_epoch(epoch, record)`` with each epoch's history record before its checkpoint."""
        stage_bar = tqdm(
            total=epochs,
            initial=progress.completed_epochs,
            desc=STAGE_TITLES[self.name],
            unit="epoch",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for epoch in range(progress.completed_epochs + 1, epochs + 1):
            started = time.perf_counter()
            seed = [self.config.stage_seed(self.name), STAGE_INDEX[self.name], epoch]
            seed_torch(seed)
            # The same batches on every rank (same seed), dealt round-robin between them.
            batches = rank_batches(self.sampler.epoch(np.random.default_rng(seed)), self.world)
            with PeakMemory(self.device) as peak:
                loss = train_epoch(
                    self.trainer,
                    self.optimizer,
                    batches,
                    self.device,
                    f"{self.name} epoch {epoch}/{epochs}",
                    self.progress,
                )
            trained = time.perf_counter() - started
            metrics = evaluate_model(self.model, self.evaluation, self.user_groups, self.num_items, self.config)
            record = {
                "epoch": epoch,
                "loss": loss,
                "seconds": time.perf_counter() - started,
                "train_seconds": trained,
                "train_peak_bytes": peak.bytes,
                **metrics,
            }
            progress.history.append(record)
            best = progress.best
            improved = best is None or metrics["valid"][SELECTION_METRIC] > best["valid"][SELECTION_METRIC]
            if improved:
                progress.best = {"epoch": epoch, "valid": metrics["valid"], "test": metrics["test"]}
            previous = progress.completed_epochs
            progress.completed_epochs = epoch
            if self.world.is_main:  # ranks hold identical weights; one writes
                if improved:
                    save_tensors(self.run.best(self.name), self.model.trainable_state(), {"epoch": epoch})
                on_epoch(epoch, record)
                tensors, param_groups = optimizer_tensors(self.optimizer)
                save_tensors(
                    self.run.checkpoint(self.name, epoch),
                    {**self.model.trainable_state(), **tensors},
                    {"epoch": epoch, "param_groups": param_groups},
                )
                save_state()
                if previous:
                    self.run.checkpoint(self.name, previous).unlink(missing_ok=True)
            self.world.barrier()
            self.report(
                f"{self.name} epoch {epoch}/{epochs}  loss {loss:.4f}  valid {SELECTION_METRIC} {metrics['valid'][SELECTION_METRIC]:.4f}  "
                f"test NDCG@20 {metrics['test']['NDCG@20']:.4f}{'  *' if improved else ''}"
            )
            stage_bar.update(1)
        stage_bar.close()


def stage_summary(progress: StageProgress, epochs: int) -> dict[str, Any]:
    """A finished stage's entry in ``metrics.json``: its best epoch and that epoch's metrics."""
    best = progress.best
    return {"best_epoch": best["epoch"], "epochs": epochs, "valid": best["valid"], "test": best["test"]}
