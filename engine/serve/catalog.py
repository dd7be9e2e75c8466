"""Items added to a finished run's catalog without retraining (`embed --add-items`).

An added item has no ID embedding (those are learned for the training catalog), so its row in group g's
table is the multimodal term alone, z = 0.5·MLP_g(E_g(x)): the item goes through every group's adapters
and projector, and through the Global-PEFT snapshot for the table that places new users.

Each addition is one file written once, ``embeddings/additions/NNNN.safetensors`` (``items``
``[C, n, d]``, ``snapshot`` ``[1, n, d]``); ``embeddings/catalog.json`` (the added items' ids, texts and
images, per addition) is replaced after it, atomically, and its number of additions is the catalog's
version. A reader reads that JSON and then only the files it names, so it never meets a half-written
table: the service (`engine.service.live`) polls it and swaps in the grown tables whole.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perpeft.engine.config.methods import method_of
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.data.formats import load_item_file
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.errors import InputError
from perpeft.engine.features.inputs import modality_presence
from perpeft.engine.runtime.atomic import atomic_write_json
from perpeft.engine.runtime.device import resolve_device
from perpeft.engine.runtime.distributed import current_world
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.runtime.run_lock import holding_run_lock
from perpeft.engine.runtime.tensors import load_tensors, save_tensors
from perpeft.engine.serve.embed import grouped_item_tables, load_embeddings, load_model


@dataclass(frozen=True)
class AddedItem:
    """An item added after training: its original id, text and image file (None: no image)."""

    id: str
    title: str
    image: Path | None


@dataclass(frozen=True)
class Catalog:
    """Every item added to a run, in order, with their rows of each group's table ``[C, n, d]`` and of the
    snapshot's ``[1, n, d]``; ``version`` counts the additions (0: the training catalog alone)."""

    version: int
    items: list[AddedItem]
    tables: torch.Tensor
    snapshot: torch.Tensor

    @classmethod
    def empty(cls, groups: int, width: int) -> "Catalog":
        """The training catalog alone: nothing added."""
        return cls(0, [], torch.zeros(groups, 0, width), torch.zeros(1, 0, width))

    def extend(self, dataset: Dataset) -> Dataset:
        """``dataset`` with the added items after its own (engine indices I+1…)."""
        return dataclasses.replace(
            dataset,
            item_ids=[*dataset.item_ids, *(item.id for item in self.items)],
            titles=[*dataset.titles, *(item.title for item in self.items)],
            image_paths=[*dataset.image_paths, *(item.image for item in self.items)],
        )


def _record(run: RunDirectory) -> list[dict[str, Any]]:
    """catalog.json's additions (none when the file is absent); InputError naming it when malformed."""
    path = run.embedded_catalog
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        additions = record["additions"]
        if record["version"] != len(additions):
            raise ValueError(f"version {record['version']} but {len(additions)} additions")
        fields = {"id", "title", "image"}
        if any(set(item) != fields for addition in additions for item in addition["items"]):
            raise ValueError(f"an item without exactly the fields {sorted(fields)}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a catalog that `embed --add-items` wrote ({error})") from None
    return additions


def read_catalog(run: RunDirectory) -> Catalog:
    """The items added to ``run`` and their table rows, checked against the run's C and d; InputError
    (one line, naming the file) when catalog.json or a table it names is missing or malformed."""
    config = run.config
    groups, width = config.groups, config.hidden
    empty = Catalog.empty(groups, width)
    items: list[AddedItem] = []
    tables, snapshots = [empty.tables], [empty.snapshot]
    additions = _record(run)
    for version, addition in enumerate(additions, start=1):
        path = run.embedded_addition(version)
        if not path.is_file():
            raise InputError(f"{path}: missing, but {run.embedded_catalog} names it")
        tensors = load_tensors(path)[0]
        count = len(addition["items"])
        for name, rows, tensor in (("items", groups, tables), ("snapshot", 1, snapshots)):
            found = tensors.get(name)
            if found is None or tuple(found.shape) != (rows, count, width):
                shape = None if found is None else list(found.shape)
                raise InputError(f"{path}: {name} is {shape}, but {count} added items need {[rows, count, width]}")
            tensor.append(found)
        items += [
            AddedItem(str(item["id"]), str(item["title"]), Path(item["image"]) if item["image"] else None)
            for item in addition["items"]
        ]
    return Catalog(len(additions), items, torch.cat(tables, dim=1), torch.cat(snapshots, dim=1))


def _check_modalities(config: RunConfig, dataset: Dataset, added: Dataset, path: Path) -> None:
    """InputError unless the added items carry what the run's encoder reads: each modality it encodes, and
    no missing image or text unless the training catalog had some (the model then learned placeholders)."""
    if config.image and not added.has_images:
        raise InputError(f"{path}: the added items have no images (no images/ beside the file); the run encodes images")
    if config.text and not added.has_text:
        raise InputError(f"{path}: the added items have no text; the run encodes item text")
    lacking = np.flatnonzero(~modality_presence(added)[1:].all(axis=1))
    if lacking.size and modality_presence(dataset)[1:].all():
        item = added.item_ids[int(lacking[0]) + 1]
        raise InputError(
            f"{path}: item {item!r} lacks its image or text, but every training item had both, so the run"
            " learned no placeholder for a missing one"
        )


def add_items(
    path: Path,
    item_file: Path,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[Catalog, int]:
    """Encode the items of the RecBole item file ``item_file`` (images in ``images/`` beside it) through
    every group's adapters and the snapshot, and publish them as the next catalog version of the run at
    ``path``; returns the new catalog and how many items this call added. ``batch_size`` is in (item,
    group) pairs (default: the run's ``encode_batch_size``).

    InputError (one line) when the run has no embeddings, scores items by ID alone (w/o MM), or the file
    is malformed, repeats an id already in the catalog, or lacks what the run's encoder reads."""
    run = RunDirectory.open(path)
    if not current_world().alone:
        raise InputError("embed --add-items runs in one process: start it without torchrun")
    with holding_run_lock(run.path):
        return _add_items(run, Path(item_file), batch_size, device, progress)


def _add_items(
    run: RunDirectory, item_file: Path, batch_size: int | None, device: str | None, progress: bool
) -> tuple[Catalog, int]:
    checkpoint = run.best_checkpoint("perpeft")
    config = run.config
    if method_of(config).encoder == "none":
        raise InputError(
            f"{run.path}: method {config.method} scores items by their ID embeddings alone; adding items"
            " needs retraining"
        )
    load_embeddings(run)
    dataset = run_dataset(config)
    catalog = read_catalog(run)
    ids, titles, images = load_item_file(item_file, config.text_field_names)
    present = set(dataset.item_ids[1:]) | {item.id for item in catalog.items}
    repeated = [item for item in ids if item in present]
    if repeated:
        shown = ", ".join(map(repr, repeated[:5])) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise InputError(f"{item_file}: already in the run's catalog: {shown}")
    added = Dataset(
        f"{dataset.name}-added-{catalog.version + 1}",
        item_file.parent,
        [None, *ids],
        ["", *titles],
        [None, *images],
        [None],
        [np.zeros(0, dtype=np.int64)],
    )
    resolved = config.for_catalog(dataset.has_text, dataset.has_images, str(dataset.root))
    _check_modalities(resolved, dataset, added, item_file)
    from perpeft.engine.model.run_inputs import load_run_inputs  # transformers: only when items are added

    run_inputs = load_run_inputs(resolved, added, progress)
    target = resolve_device(device or config.device)
    batch_size = batch_size or config.encode_batch_size
    rows = {}
    for name, checkpoint_path, groups in (("items", checkpoint, config.groups), ("snapshot", run.snapshot, 1)):
        model = load_model(run, checkpoint_path, groups, dataset.num_items, run_inputs).to(target)
        rows[name] = grouped_item_tables(model, added.num_items, batch_size, progress=progress, with_ids=False)[:, 1:]
    version = catalog.version + 1
    save_tensors(run.embedded_addition(version), rows)
    entries = [
        {"id": item, "title": title, "image": None if image is None else str(image.resolve())}
        for item, title, image in zip(ids, titles, images, strict=True)
    ]
    additions = [*_record(run), {"source": str(item_file.resolve()), "items": entries}]
    atomic_write_json(run.embedded_catalog, {"version": version, "additions": additions})  # publishes it
    return read_catalog(run), len(ids)
