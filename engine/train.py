"""The stage loop every method shares, and the PerPEFT pipeline: Global PEFT → grouping → PerPEFT."""

import contextlib
import dataclasses
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from perpeft.kernels import bce_with_negatives

from .adapters.iisan import GroupedIISAN
from .config import RunConfig
from .data.dataset import Dataset
from .data.sampler import Batch, TrainSampler
from .data.sources import load_dataset
from .data.split import Split, last_window, leave_one_out
from .distributed import World, current_world
from .encoder import MODALITIES, ClipBundle, FrozenFeatures, GroupedClipEncoder, load_clip
from .errors import InputError
from .evaluate import HistoryIndex, full_ranking_metrics
from .grouping import fit_groups
from .hidden_cache import HiddenStates, load_hidden_states
from .inputs import ItemInputs, load_item_inputs, to_device
from .memory import PeakMemory
from .methods import METHODS, large_adapter_config, method_of
from .model import Recommender
from .run import RunDirectory, atomic_write_bytes, load_tensors, optimizer_tensors, restore_optimizer, save_tensors

ID_NORM_WEIGHT = 1e-6
SELECTION_METRIC = "HR@30"
STAGE_INDEX = {"global": 1, "perpeft": 2, "grouped": 2}
STAGE_TITLES = {"global": "Global PEFT", "perpeft": "PerPEFT", "grouped": "Group-level"}
SNAPSHOT = "global/snapshot-e1.safetensors"
GROUPING = "grouping.safetensors"
# Settings of the machine, not of the experiment: a run reusing another's Global stage may change them.
RESEED_MACHINE_SETTINGS = ("device", "precision", "compile")
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


def compiles_sasrec(setting: str, device: torch.device) -> bool:
    """``auto`` compiles SASRec on CUDA only: on CPU the first compile (~30 s) outweighs the gain."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ItemInputSource(Protocol):
    """Where an item encoder's inputs come from: cached tokens/pixels, or cached CLIP hidden states."""

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]: ...


EncoderFactory = Callable[[int], nn.Module]


def kept_modalities(config: RunConfig) -> tuple[str, ...]:
    """The modalities a run encodes (``--no-text`` / ``--no-image`` drop one)."""
    return tuple(name for name, kept in zip(MODALITIES, (config.image, config.text), strict=True) if kept)


def clip_encoder_factory(config: RunConfig, bundle: ClipBundle) -> EncoderFactory:
    """Builds the grouped-adapter CLIP encoder for a given number of groups."""

    def build(groups: int) -> nn.Module:
        return GroupedClipEncoder(
            bundle,
            config.peft,
            groups,
            kept_modalities(config),
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
        )

    return build


@dataclass
class ItemIds:
    """Input source of ``FrozenFeatures``: the item ids themselves; modality presence from the input cache."""

    inputs: ItemInputs

    @property
    def has_missing(self) -> bool:
        return self.inputs.has_missing

    def modalities(self, items: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.inputs.modalities(items, device)

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (items.to(device),)


@torch.no_grad()
def encode_frozen(
    config: RunConfig, bundle: ClipBundle, inputs: ItemInputs, device: torch.device, progress: bool
) -> tuple[EncoderFactory, ItemIds]:
    """Frozen MM: every item through CLIP without adapters once; training then only looks rows up."""
    encoder = GroupedClipEncoder(bundle, "none", 1, kept_modalities(config)).to(device).eval()
    items = torch.arange(inputs.present.shape[0])
    parts = []
    for chunk in tqdm(items.split(config.encode_batch_size), desc="frozen CLIP", disable=not progress, leave=False):
        zeros = torch.zeros(chunk.shape[0], dtype=torch.long, device=device)
        parts.append(encoder(*inputs.batch(chunk, device), zeros).float().cpu())
    features = torch.cat(parts)
    width = bundle.model.config.projection_dim
    return (lambda groups: FrozenFeatures(features, encoder.modalities, width)), ItemIds(inputs)


def iisan_encoder_factory(states: HiddenStates) -> EncoderFactory:
    """Builds the grouped IISAN side network over ``states``' cached hidden states for a number of groups."""

    def build(groups: int) -> nn.Module:
        return GroupedIISAN(groups, states.text_dim, states.image_dim, states.layers)

    return build


class PerpeftModel(nn.Module):
    """Item encoder with grouped PEFT (optional) + projector + ID embeddings + SASRec, for C groups.

    ``C = 1`` is Global PEFT. The encoder is called as ``encoder(*inputs.batch(items), group_ids)`` and
    exposes ``out_features``; only adapter, projector, embedding and SASRec parameters train.
    ``personal_index`` (int64 ``[U+1]``, user → row) gives SASRec the method's user or group embedding
    (User-level / Group-level); rows are users for User-level and the run's C groups for Group-level.
    """

    def __init__(
        self,
        config: RunConfig,
        make_encoder: EncoderFactory | None,
        inputs: ItemInputSource | None,
        num_items: int,
        groups: int,
        personal_index: torch.Tensor | None = None,
    ):
        super().__init__()
        self.groups = groups
        self.inputs = inputs
        self.encoder = make_encoder(groups) if make_encoder is not None else None
        # Learned placeholders stand in for missing images/titles, only when the catalog has such items.
        self.fills_missing = hasattr(self.encoder, "modality_columns") and bool(getattr(inputs, "has_missing", False))
        if self.fills_missing:
            self.present_columns = [MODALITIES.index(name) for name in self.encoder.modalities]
        method = METHODS[config.method]
        personal_rows = 0
        if personal_index is not None:
            personal_rows = config.groups if method.personal == "group" else personal_index.shape[0]
            self.register_buffer("personal_index", personal_index.long(), persistent=False)
        else:
            self.personal_index = None
        self.recommender = Recommender(
            num_items,
            groups,
            self.encoder.out_features if self.encoder is not None else None,
            hidden=config.hidden,
            maxlen=config.maxlen,
            dropout=config.dropout,
            placeholders=self.encoder.modality_columns if self.fills_missing else None,
            personal_rows=personal_rows,
            personal_mode=method.personal_mode,
        )
        self.autocast = config.precision == "bf16" or (
            config.precision == "auto" and resolve_device(config.device).type == "cuda"
        )

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        state = self.trainable_state()
        missing = sorted(set(state) - set(tensors))
        if missing:
            raise KeyError(f"checkpoint lacks {missing[:3]}…")
        with torch.no_grad():
            for name, parameter in state.items():
                parameter.copy_(tensors[name])

    def init_from_single_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every group's adapter and projector start as copies of the Global PEFT ones (paper §3.3.3);
        personal (group) embeddings, which Global PEFT lacks, keep their initialisation."""
        with torch.no_grad():
            for name, parameter in self.trainable_state().items():
                if name not in tensors and name.startswith("recommender.personal."):
                    continue
                source = tensors[name]
                if source.shape == parameter.shape:
                    parameter.copy_(source)
                else:
                    parameter.copy_(source.expand_as(parameter))

    def _precision(self) -> contextlib.AbstractContextManager:
        device = self.recommender.item_embeddings.weight.device
        if self.autocast and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def item_vectors(self, items: torch.Tensor, group: int | torch.Tensor) -> torch.Tensor:
        """z for ``items`` (``[N]``, 0 allowed: padding gives zeros), each seen by ``group`` (one group for
        all, or a per-row ``[N]`` tensor: the grouped encoder serves any mix of groups in one pass).

        Which rows are padding is decided on the host: with ``items`` on the CPU (as training and
        evaluation pass them) a CUDA step never waits for the device to answer it."""
        device = self.recommender.item_embeddings.weight.device
        host = items.cpu()
        items = to_device(host, device)
        if isinstance(group, torch.Tensor):
            group_ids = to_device(group, device)
        else:
            group_ids = torch.full((items.shape[0],), group, dtype=torch.long, device=device)
        if self.encoder is None:
            return self.recommender.item_vectors(items, None, group_ids)
        real = (host != 0).nonzero().squeeze(1)
        multimodal = torch.zeros(items.shape[0], self.encoder.out_features, device=device)
        if real.numel():
            rows = to_device(real, device)
            with self._precision():
                encoded = self.encoder(*self.inputs.batch(host[real], device), group_ids[rows])
            multimodal = multimodal.index_put((rows,), encoded.float())
        present = self.inputs.modalities(host, device)[:, self.present_columns] if self.fills_missing else None
        return self.recommender.item_vectors(items, multimodal, group_ids, present)

    def personal_rows(self, users: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of the personal embedding for ``users`` (None when the method has none)."""
        if self.personal_index is None:
            return None
        if users is None:
            raise ValueError("this model has personal embeddings: pass the users")
        return self.personal_index[to_device(users, self.personal_index.device)]

    def forward(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """The training loss of ``batch``: DistributedDataParallel calls the module, so this is ``training_loss``."""
        return self.training_loss(batch, device)

    def training_loss(self, batch: Batch, device: torch.device) -> torch.Tensor:
        # Distinct items on the host (np.unique: sorted, like torch.unique), so no step waits for the device.
        positions = np.stack([batch.seq, batch.pos, batch.neg])
        unique, inverse = np.unique(positions, return_inverse=True)
        inverse = to_device(torch.from_numpy(inverse.reshape(positions.shape)), device)
        vectors = self.item_vectors(torch.from_numpy(unique), max(batch.group, 0))[inverse]
        seq, pos = (to_device(torch.from_numpy(array), device) for array in (batch.seq, batch.pos))
        output = self.recommender.sequence_output(seq, vectors[0], self.personal_rows(torch.from_numpy(batch.users)))
        width = output.shape[-1]
        loss = bce_with_negatives(
            output.reshape(-1, width),
            vectors[1].reshape(-1, width),
            vectors[2].reshape(-1, width),
            (pos != 0).reshape(-1),
        )
        return loss + ID_NORM_WEIGHT * self.recommender.id_norm()

    @torch.no_grad()
    def item_tables(self, num_items: int, chunk: int) -> torch.Tensor:
        """Every group's item table ``[C, I+1, d]`` (row 0 is padding). Items are encoded in chunks of
        similar title length when the inputs are tokens (fewer padded columns). Under a process group
        each rank encodes a block of the chunks and the rows are gathered: the same batches as one process."""
        device = self.recommender.item_embeddings.weight.device
        world = current_world()
        if isinstance(self.inputs, ItemInputs):
            order = torch.from_numpy(self.inputs.by_text_width())
        else:
            order = torch.arange(num_items + 1)
        parts = order.split(chunk)
        mine = [parts[index] for index in world.block(len(parts))]
        rows = [torch.stack([self.item_vectors(part, group) for group in range(self.groups)], dim=1) for part in mine]
        local = torch.cat(rows) if rows else torch.zeros(0, self.groups, self.recommender.hidden, device=device)
        ordered = world.gather_rows(local)
        tables = torch.empty_like(ordered)
        tables[order.to(ordered.device)] = ordered
        return tables.transpose(0, 1).contiguous()

    @torch.no_grad()
    def user_vectors(
        self,
        windows: torch.Tensor,
        user_groups: torch.Tensor,
        tables: torch.Tensor,
        chunk: int,
        users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SASRec's last-position output for each ``[L]`` window, read through the user's group table;
        ``users`` (engine ids) are needed only by methods with user or group embeddings."""
        rows = self.personal_rows(users)
        outputs = [windows.new_zeros((0, self.recommender.hidden), dtype=tables.dtype)]
        for start in range(0, windows.shape[0], chunk):
            window, groups = windows[start : start + chunk], user_groups[start : start + chunk]
            vectors = tables[groups.unsqueeze(1), window]
            personal = None if rows is None else rows[start : start + chunk]
            outputs.append(self.recommender.sequence_output(window, vectors, personal)[:, -1])
        return torch.cat(outputs)

    @torch.no_grad()
    def gathered_user_vectors(
        self,
        windows: torch.Tensor,
        user_groups: torch.Tensor,
        tables: torch.Tensor,
        chunk: int,
        users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`user_vectors` of every window; under a process group each rank encodes a block of them and
        the vectors are gathered on every rank."""
        world = current_world()
        block = world.block_slice(windows.shape[0])
        personal = None if users is None else users[block]
        return world.gather_rows(self.user_vectors(windows[block], user_groups[block], tables, chunk, personal))


@dataclass
class EvaluationData:
    """Everything evaluation needs that does not change between epochs."""

    users: np.ndarray
    windows: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    histories: dict[str, HistoryIndex]

    @classmethod
    def build(cls, split: Split, maxlen: int, device: torch.device) -> "EvaluationData":
        users = split.eval_users
        windows, targets, histories = {}, {}, {}
        for stage, target in (("valid", split.valid_target), ("test", split.test_target)):
            stage_history = split.history(stage)
            history = [stage_history[user] for user in users]
            windows[stage] = torch.from_numpy(last_window(history, maxlen)).to(device)
            targets[stage] = torch.from_numpy(target[users]).to(device)
            histories[stage] = HistoryIndex.from_sequences(history).to(device)
        return cls(users, windows, targets, histories)


def evaluate_model(
    model: PerpeftModel, data: EvaluationData, user_groups: np.ndarray, num_items: int, config: RunConfig
) -> dict[str, dict[str, float]]:
    """Validation and test metrics with full ranking, each user scored with its group's table."""
    model.eval()
    device = model.recommender.item_embeddings.weight.device
    tables = model.item_tables(num_items, config.encode_batch_size)
    # Under a process group each rank scores a block of the users; metric sums are added over ranks.
    index = current_world().block_slice(len(data.users))
    groups = torch.from_numpy(user_groups[data.users[index]]).to(device)
    users = torch.from_numpy(data.users[index])
    results = {}
    for stage in ("valid", "test"):
        vectors = model.user_vectors(data.windows[stage][index], groups, tables, config.eval_batch_size, users)
        targets, histories = data.targets[stage][index], data.histories[stage].select(index)
        results[stage] = full_ranking_metrics(vectors, tables, groups, targets, histories)
    return results


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
            [parameter for parameter in model.parameters() if parameter.requires_grad],
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

    def _checkpoint_name(self, epoch: int) -> str:
        return f"{self.name}/epoch-{epoch:03d}.safetensors"

    def resume(self, state: dict[str, Any]) -> None:
        """Load model and optimizer from the stage's last completed epoch."""
        completed = state.get("completed_epochs", 0)
        if completed:
            tensors, metadata = load_tensors(self.run.file(self._checkpoint_name(completed)))
            self.model.load_trainable_state(tensors)
            restore_optimizer(self.optimizer, tensors, metadata["param_groups"])

    def train(
        self, epochs: int, state: dict[str, Any], save_state: Callable[[], None], on_epoch: Callable[[int], None]
    ) -> None:
        """Run epochs ``completed+1 .. epochs``, updating ``state`` (history, best) after each."""
        state.setdefault("completed_epochs", 0)
        state.setdefault("history", [])
        stage_bar = tqdm(
            total=epochs,
            initial=state["completed_epochs"],
            desc=STAGE_TITLES[self.name],
            unit="epoch",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for epoch in range(state["completed_epochs"] + 1, epochs + 1):
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
            state["history"].append(record)
            best = state.get("best")
            improved = best is None or metrics["valid"][SELECTION_METRIC] > best["valid"][SELECTION_METRIC]
            if improved:
                state["best"] = {"epoch": epoch, "valid": metrics["valid"], "test": metrics["test"]}
            previous = state["completed_epochs"]
            state["completed_epochs"] = epoch
            if self.world.is_main:  # ranks hold identical weights; one writes
                if improved:
                    save_tensors(
                        self.run.file(f"{self.name}/best.safetensors"), self.model.trainable_state(), {"epoch": epoch}
                    )
                on_epoch(epoch)
                tensors, param_groups = optimizer_tensors(self.optimizer)
                save_tensors(
                    self.run.file(self._checkpoint_name(epoch)),
                    {**self.model.trainable_state(), **tensors},
                    {"epoch": epoch, "param_groups": param_groups},
                )
                save_state()
                if previous:
                    self.run.file(self._checkpoint_name(previous)).unlink(missing_ok=True)
            self.world.barrier()
            self.report(
                f"{self.name} epoch {epoch}/{epochs}  loss {loss:.4f}  valid HR@30 {metrics['valid']['HR@30']:.4f}  "
                f"test NDCG@20 {metrics['test']['NDCG@20']:.4f}{'  *' if improved else ''}"
            )
            stage_bar.update(1)
        stage_bar.close()


def stage_summary(stage_state: dict[str, Any], epochs: int) -> dict[str, Any]:
    best = stage_state["best"]
    return {"best_epoch": best["epoch"], "epochs": epochs, "valid": best["valid"], "test": best["test"]}


@dataclass
class RunInputs:
    """What a run trains on: the dataset, how to build its item encoder for C groups, and the encoder's inputs."""

    dataset: Dataset
    make_encoder: EncoderFactory | None
    inputs: ItemInputSource | None


def run_pipeline(
    run: RunDirectory, run_inputs: RunInputs, report: Report = print, progress: bool = True
) -> dict[str, Any]:
    """The run's method through the shared stage loop.

    Stage ``global`` (one adapter, C = 1) trains E1+E2 epochs for single-stage methods. Two-stage
    methods (PerPEFT, Group-level) stop it at E1 (or, with ``baseline``, train on to E1+E2 as the fair
    Global PEFT baseline) and group users on the epoch-E1 snapshot; stage ``perpeft`` then trains C
    adapters + projectors (or stage ``grouped`` one adapter + a group embedding) for E2 epochs, warm-started
    from the snapshot.

    Resumable: every epoch ends with an atomic checkpoint and ``state.json``; a rerun on the same
    directory continues where it stopped and reproduces an uninterrupted run's metrics on CPU.
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

    e1, e2 = config.epochs_global, config.epochs_perpeft
    global_epochs = e1 if method.two_stage and not config.baseline else e1 + e2
    no_groups = np.zeros(dataset.num_users + 1, dtype=np.int64)

    def stage(
        name: str, groups: int, sampler: TrainSampler, user_groups: np.ndarray, personal: np.ndarray | None = None
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
        runner.resume(state.setdefault(name, {}))
        return runner

    plain_sampler = TrainSampler(split.train, dataset.num_items, config.maxlen, config.batch_size)
    users = np.arange(dataset.num_users + 1, dtype=np.int64) if method.personal == "user" else None
    global_stage = stage("global", 1, plain_sampler, no_groups, users)

    def save_snapshot(epoch: int) -> None:
        if method.two_stage and epoch == e1:
            save_tensors(run.file(SNAPSHOT), global_stage.model.trainable_state(), {"epoch": epoch})

    global_stage.train(global_epochs, state["global"], save_state, save_snapshot)
    stages = {"global": global_epochs}

    if method.two_stage:
        if "grouping" not in state:
            global_stage.model.load_trainable_state(load_tensors(run.file(SNAPSHOT))[0])
            assignment, centroids = fit_groups(global_stage.model, split, dataset.num_items, config)
            if world.is_main:
                grouping = {"assignment": torch.from_numpy(assignment), "centroids": centroids}
                save_tensors(run.file(GROUPING), grouping)
            sizes = np.bincount(assignment[1:], minlength=config.groups).tolist()
            state["grouping"] = {"sizes": sizes, "grouping": config.grouping, "clustering": config.clustering}
            save_state()
            world.barrier()
            report(f"grouping: {config.groups} groups of sizes {sizes}")
        global_stage = None  # release the Global PEFT model (and its CLIP copy) before the next stage builds its own
        assignment = load_tensors(run.file(GROUPING))[0]["assignment"].numpy()
        if method.grouped_adapters:
            name = "perpeft"
            sampler = TrainSampler(
                split.train, dataset.num_items, config.maxlen, config.batch_size, assignment, config.group_negatives
            )
            second = stage(name, config.groups, sampler, assignment)
        else:
            name = "grouped"
            second = stage(name, 1, plain_sampler, no_groups, assignment)
        if not state[name].get("completed_epochs"):
            second.model.init_from_single_group(load_tensors(run.file(SNAPSHOT))[0])
        second.train(e2, state[name], save_state, lambda epoch: None)
        stages[name] = e2

    metrics = {
        "dataset": dataset.name,
        "method": config.method,
        "peft": config.peft if method.uses_peft else None,
        "groups": config.groups,
        "seed": config.seed,
        **({"global_seed": config.global_seed} if config.global_seed is not None else {}),
        "result": list(stages)[-1],
        **{name: stage_summary(state[name], epochs) for name, epochs in stages.items()},
    }
    if method.two_stage:
        metrics["global"]["model"] = "baseline" if config.baseline else "stage1"
    if world.is_main:
        run.write_metrics(metrics)
    state["done"] = True
    save_state()
    world.barrier()
    return metrics


def silent(line: str) -> None:
    """A report that prints nothing (ranks other than 0, cells of an experiment grid)."""


def load_run_inputs(config: RunConfig, progress: bool) -> RunInputs:
    """Dataset, item encoder and cached item inputs of a run: every user-input error surfaces here.

    Under a process group rank 0 loads first (filling the input and hidden-state caches), then the
    other ranks load from those caches, without progress bars."""
    return current_world().main_first(
        lambda: _load_run_inputs(config, progress), lambda: _load_run_inputs(config, False)
    )


def _load_run_inputs(config: RunConfig, progress: bool) -> RunInputs:
    dataset = load_dataset(config.data, config.data_dir)
    method = method_of(config)
    if method.encoder == "none":
        return RunInputs(dataset, None, None)  # w/o MM: ID embeddings only, CLIP never loads
    bundle = load_clip(config.clip)
    inputs = load_item_inputs(dataset, bundle.tokenizer, bundle.tokenizer_id, bundle.image_size, progress)
    device = resolve_device(config.device)
    if method.encoder == "frozen":
        return RunInputs(dataset, *encode_frozen(config, bundle, inputs, device, progress))
    if config.peft == "iisan":
        # The side network reads cached hidden states: training never runs CLIP.
        states = load_hidden_states(bundle, inputs, device, config.encode_batch_size, progress)
        return RunInputs(dataset, iisan_encoder_factory(states), states)
    return RunInputs(dataset, clip_encoder_factory(config, bundle), inputs)


def train_new_run(
    config: RunConfig,
    out: Path,
    overwrite: bool,
    report: Report = print,
    progress: bool = True,
    global_from: RunDirectory | None = None,
) -> tuple[RunDirectory, dict[str, Any]]:
    """Validate the inputs, then create ``out`` (refusing an existing run unless ``overwrite``) and train;
    with ``global_from`` (see `reseeded_config`) the run starts from that run's Global stage and grouping."""
    config = config.resolved()
    if method_of(config).large:
        config, counts = large_adapter_config(config)
        report(
            f"large-global-peft: one LoRA adapter of rank {config.lora_rank} has "
            f"{counts['large_global_peft_adapter']:,} parameters; PerPEFT's {config.groups} adapters "
            f"{counts['perpeft_adapters_total']:,}"
        )
    if global_from is not None and not shares_global_stage(config, global_from.config):
        raise ValueError(f"{global_from.path} trained another Global stage than {config} would: use reseeded_config")
    run_inputs = load_run_inputs(config, progress)

    def create() -> RunDirectory:
        run = RunDirectory.create(out, config, overwrite)
        if global_from is not None:
            reuse_global_stage(global_from, run)
        return run

    # Rank 0 creates the directory before the other ranks open it.
    run = current_world().main_first(create, lambda: RunDirectory.open(out))
    return run, run_pipeline(run, run_inputs, report, progress)


def reseeded_config(source: RunDirectory, seed: int, **machine: str) -> RunConfig:
    """The configuration of a run that takes ``source``'s finished Global-PEFT stage and grouping and trains
    the second stage again with ``seed`` (paper App. C.5.1: the same groups, another seed): ``source``'s
    settings with ``seed``, ``global_seed`` = the seed that trained that stage, and ``machine`` settings
    (device, precision, compile) replaced. InputError when ``source`` has no finished stage to give."""
    config = source.config
    if not method_of(config).two_stage:
        raise InputError(f"{source.path}: a --method {config.method} run has no Global stage and grouping to reuse")
    state = source.read_state()
    if "grouping" not in state or not (source.file(SNAPSHOT).is_file() and source.file(GROUPING).is_file()):
        raise InputError(
            f"{source.path}: its Global stage and grouping are not finished; finish it with `train --resume`"
        )
    if seed == config.seed:
        raise InputError(f"--seed {seed}: {source.path} trained its second stage with this seed; pick another")
    unknown = set(machine) - set(RESEED_MACHINE_SETTINGS)
    if unknown:
        raise ValueError(f"only the machine settings {RESEED_MACHINE_SETTINGS} may change, not {sorted(unknown)}")
    return dataclasses.replace(config, seed=seed, global_seed=config.stage_seed("global"), **machine)


def shares_global_stage(config: RunConfig, other: RunConfig) -> bool:
    """Whether two configurations train the same Global stage and grouping: equal but for the second stage's
    seed and the machine settings."""
    neutral = {"seed": 0, "global_seed": None, **{name: "auto" for name in RESEED_MACHINE_SETTINGS}}
    same_seed = config.stage_seed("global") == other.stage_seed("global")
    return same_seed and dataclasses.replace(config, **neutral) == dataclasses.replace(other, **neutral)


def reuse_global_stage(source: RunDirectory, run: RunDirectory) -> None:
    """Copy ``source``'s Global-PEFT stage (its checkpoints and E1 snapshot), grouping and their progress
    records into the new ``run``; `run_pipeline` then starts at the second stage. ``state.json`` is written
    last, so an interrupted copy leaves a run that retrains those steps from its own configuration."""
    for path in sorted((source.path / "global").iterdir()):
        if path.is_file() and not path.name.startswith("."):
            atomic_write_bytes(run.file(f"global/{path.name}"), path.read_bytes())
    atomic_write_bytes(run.file(GROUPING), source.file(GROUPING).read_bytes())
    state = source.read_state()
    run.write_state({"global": state["global"], "grouping": state["grouping"]})


def resume_run(path: Path, report: Report = print, progress: bool = True) -> tuple[RunDirectory, dict[str, Any]]:
    """Continue an interrupted run from its last completed epoch."""
    run = RunDirectory.open(path)
    return run, run_pipeline(run, load_run_inputs(run.config, progress), report, progress)
