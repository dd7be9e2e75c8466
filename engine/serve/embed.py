"""Serving tables of a finished run (paper App. D.2): every group's item table and every user's vector.

`embed_run` encodes all (item, group) pairs with the best-epoch PerPEFT weights in mixed-group batches
(the grouped adapters let one CLIP pass serve every group) and writes, each file atomically:

- ``embeddings/items.safetensors``: ``items`` float32 ``[C, I+1, d]``, z = 0.5·m + h, row 0 zeros;
- ``embeddings/users.safetensors``: ``users`` float32 ``[U+1, d]``, SASRec's output for the test step
  (history = train + validation item) read through the user's group table, row 0 zeros; ``groups``
  int64 ``[U+1]`` (the run's grouping) and ``centroids`` float32 ``[C, d]`` (its K-Means centroids);
- ``embeddings/snapshot.safetensors``: ``items`` float32 ``[1, I+1, d]``, the Global-PEFT snapshot's
  (epoch E1) item table: the grouping space a new user is placed in, so serving needs no item encoder;
- ``embeddings/ids.json``: ``{"users": [...], "items": [...]}``, the dataset's ids by engine index.

Finished chunks of pairs wait under ``embeddings/.partial/`` until the tables are assembled, so a rerun
after an interruption encodes only the chunks that are missing.
"""

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import last_window, leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime.atomic import atomic_write_json, read_json
from perpeft.engine.runtime.device import HostCopy, resolve_device
from perpeft.engine.runtime.distributed import current_world
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_lock import holding_run_lock
from perpeft.engine.runtime.tensors import load_tensors, save_tensors

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # run_inputs imports transformers (seconds): serving from the tables never needs it
    from perpeft.engine.model.run_inputs import RunInputs


@dataclass
class Embeddings:
    """A run's cached tables, as described in the module docstring."""

    items: torch.Tensor
    users: torch.Tensor
    groups: torch.Tensor
    centroids: torch.Tensor
    snapshot: torch.Tensor


def load_model(
    run: RunDirectory, checkpoint: Path, groups: int, num_items: int, run_inputs: "RunInputs | None" = None
) -> PerpeftModel:
    """The run's model for ``groups`` groups with ``checkpoint``'s weights, in eval mode on the CPU.

    Without ``run_inputs`` it has no item encoder and no projector: the SASRec and ID/position embeddings,
    all that scoring from cached item tables needs.
    """
    make_encoder, inputs = (run_inputs.make_encoder, run_inputs.inputs) if run_inputs else (None, None)
    model = PerpeftModel(run.config, make_encoder, inputs, num_items, groups)
    model.load_trainable_state(load_tensors(checkpoint, model.trainable_shapes())[0])
    return model.eval()


class PartialChunks:
    """Finished chunks of an interrupted ``embed``, one safetensors file each, kept for one fingerprint.

    A directory written for another fingerprint (checkpoint, chunking, device) is discarded on open.
    """

    def __init__(self, directory: Path, fingerprint: dict[str, Any]) -> None:
        self.directory = directory
        manifest = directory / "manifest.json"
        try:
            kept = read_json(manifest)
        except InputError:  # none yet, or damaged
            kept = None
        if kept != fingerprint:
            shutil.rmtree(directory, ignore_errors=True)
            atomic_write_json(manifest, fingerprint)

    def _path(self, index: int) -> Path:
        return self.directory / f"chunk-{index:06d}.safetensors"

    def load(self, index: int) -> torch.Tensor | None:
        """Chunk ``index`` if it was finished and is intact, else None (it is encoded again)."""
        path = self._path(index)
        if not path.is_file():
            return None
        try:
            return load_tensors(path, {"vectors": None})[0]["vectors"]
        except InputError as error:
            log.warning("warning: %s; encoding that chunk again", error)
            return None

    def save(self, index: int, vectors: torch.Tensor) -> None:
        save_tensors(self._path(index), {"vectors": vectors})

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@torch.no_grad()
def grouped_item_tables(
    model: PerpeftModel,
    num_items: int,
    batch_size: int,
    chunks: PartialChunks | None = None,
    progress: bool = False,
    with_ids: bool = True,
) -> torch.Tensor:
    """Every group's item table ``[C, I+1, d]`` (row 0 zeros, on the CPU), about ``batch_size`` (item, group)
    pairs per pass: ``batch_size // C`` items, whose inputs are copied to the device once and encoded under
    every group (`PerpeftModel.group_vectors`); ``with_ids=False`` for items without ID embeddings.

    With ``chunks``, each batch is a chunk: finished ones are read back, new ones are saved. Under a
    process group each rank encodes a contiguous block of the chunks (the very batches one process
    would), and the rows are gathered on every rank.
    """
    model.eval()
    world = current_world()
    batches = torch.arange(1, num_items + 1).split(max(1, batch_size // model.groups))
    mine = world.block(len(batches))
    parts = [torch.zeros(0, model.recommender.hidden)]
    bar = tqdm(mine, desc="Embedding items", unit="chunk", disable=not progress, leave=False, dynamic_ncols=True)
    # A chunk's copy back is awaited (and the chunk saved) only after the next chunk's work is queued.
    copying: tuple[int, HostCopy] | None = None

    def land() -> None:
        if copying is not None:
            index, copy = copying
            parts.append(copy.result())
            if chunks is not None:
                chunks.save(index, parts[-1])

    for index in bar:
        part = chunks.load(index) if chunks is not None else None
        if part is not None:
            land()
            copying = None
            parts.append(part)
            continue
        encoded = HostCopy.start(model.group_vectors(batches[index], with_ids).flatten(0, 1).float())
        land()
        copying = index, encoded
    land()
    tables = world.gather_rows(torch.cat(parts)).view(num_items, model.groups, -1).transpose(0, 1)
    return torch.cat([tables.new_zeros(model.groups, 1, tables.shape[-1]), tables], dim=1)


def embed_run(
    path: Path,
    batch_size: int | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> Embeddings:
    """Compute and write a finished run's embeddings (module docstring); ``batch_size`` is in (item, group)
    pairs (default: the run's ``encode_batch_size``), ``device`` defaults to the run's.

    Under ``torchrun`` the (item, group) chunks and then the users are sharded over the ranks, gathered,
    and written once, by rank 0, which holds the run's writer lock meanwhile.
    """
    RunDirectory.open(path)
    with holding_run_lock(path):
        return _embed_run(path, batch_size, overwrite, device, progress)


def _embed_run(path: Path, batch_size: int | None, overwrite: bool, device: str | None, progress: bool) -> Embeddings:
    run = RunDirectory.open(path)
    checkpoint = run.best_checkpoint("perpeft")
    world = current_world()

    def prepare_directory() -> None:
        if overwrite:  # items added since training (`catalog`) stay: the same checkpoint encoded them
            for output in run.embedding_outputs:
                output.unlink(missing_ok=True)
            shutil.rmtree(run.embedding_chunks, ignore_errors=True)
            shutil.rmtree(run.search_graphs, ignore_errors=True)
        elif all(path.is_file() for path in run.embedding_outputs):
            raise InputError(f"{run.embeddings}: embeddings exist; pass --overwrite to recompute them")

    world.main_first(prepare_directory, lambda: None)
    from perpeft.engine.model.run_inputs import load_run_inputs

    config = run.config
    dataset = run_dataset(config)
    run_inputs = load_run_inputs(config, dataset, progress)
    progress = progress and world.is_main
    target = resolve_device(device or config.device)
    model = load_model(run, checkpoint, config.groups, dataset.num_items, run_inputs).to(target)
    batch_size = batch_size or config.encode_batch_size
    fingerprint = {
        "checkpoint": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "items_per_pass": max(1, batch_size // config.groups),
        "groups": config.groups,
        "items": dataset.num_items,
        "device": target.type,
    }
    # Rank 0 opens (or resets) the partial-chunk directory before the others add their chunks to it.
    chunks = world.main_first(lambda: PartialChunks(run.embedding_chunks, fingerprint))
    tables = grouped_item_tables(model, dataset.num_items, batch_size, chunks, progress)

    assignment, centroids = run.read_grouping()
    windows = torch.from_numpy(last_window(leave_one_out(dataset.sequences).history("test"), config.maxlen))
    users = model.gathered_user_vectors(
        windows.to(target), assignment.to(target), tables.to(target), config.eval_batch_size
    ).cpu()
    users[0] = 0.0
    # The very table the grouping read at E1 (`user_space_vectors`: same function, same batches).
    snapshot = load_model(run, run.snapshot, 1, dataset.num_items, run_inputs).to(target)
    snapshot_table = snapshot.item_tables(dataset.num_items, config.encode_batch_size).float().cpu()
    embeddings = Embeddings(tables, users, assignment, centroids, snapshot_table)
    if world.is_main:
        save_tensors(run.embedded_items, {"items": embeddings.items})
        save_tensors(
            run.embedded_users,
            {"users": embeddings.users, "groups": embeddings.groups, "centroids": embeddings.centroids},
        )
        save_tensors(run.embedded_snapshot, {"items": embeddings.snapshot})
        atomic_write_json(run.embedded_ids, {"users": dataset.user_ids, "items": dataset.item_ids})
        chunks.discard()
    world.barrier()
    return embeddings


def load_embeddings(run: RunDirectory) -> Embeddings:
    """The tables ``embed`` wrote for ``run``; InputError when they are missing or incomplete."""
    missing = [path.name for path in run.embedding_outputs if not path.is_file()]
    if len(missing) == len(run.embedding_outputs):
        raise InputError(f"{run.path}: no embeddings; compute them first with `perpeft-engine embed --run {run.path}`")
    if missing:
        raise InputError(
            f"{run.embeddings}: incomplete embeddings (no {', '.join(missing)}); recompute them with "
            f"`perpeft-engine embed --run {run.path} --overwrite`"
        )
    users = load_tensors(run.embedded_users, {"users": None, "groups": None, "centroids": None})[0]
    return Embeddings(
        load_tensors(run.embedded_items, {"items": None})[0]["items"],
        users["users"],
        users["groups"],
        users["centroids"],
        load_tensors(run.embedded_snapshot, {"items": None})[0]["items"],
    )
