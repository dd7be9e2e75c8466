"""Serving from a run's cached embeddings: recomputed metrics, and top-K for known and new users.

A known user is scored with its group's table. A new user, given as a purchase history, is placed in the
grouping space by the very Global-PEFT snapshot the grouping was fitted on (epoch E1, read through its
cached item table), joins the group of the nearest K-Means centroid (paper App. D.2.2), and is then scored
like a known user of that group. No item encoder runs: a service computes known users' vectors once,
when the run is opened (a one-off `recommend` only those asked for); a batch of new users takes two
SASRec passes (the snapshot's, then PerPEFT's); every request then takes an inner-product search in its
group's table.
"""

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import torch

from perpeft.engine.config.choices import DEFAULT_K
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import last_window, leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.eval.evaluation import EvaluationData
from perpeft.engine.eval.metrics import full_ranking_metrics
from perpeft.engine.eval.users import nearest_centroid
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime.atomic import read_json
from perpeft.engine.runtime.distributed import current_world
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.catalog import Catalog, read_catalog
from perpeft.engine.serve.embed import Embeddings, load_embeddings, load_model
from perpeft.engine.serve.index import ExactIndex, SearchIndex, build_index


def evaluate_run(path: Path) -> dict[str, dict[str, float]]:
    """Validation and test metrics of the best PerPEFT epoch, recomputed from the embeddings with full ranking.

    Test users take their cached vectors (train + validation history); validation users are encoded from
    their train history through the cached tables with the run's SASRec. Under ``torchrun`` each rank
    ranks a block of the users and the metric sums are added over the ranks.
    """
    run = RunDirectory.open(path)
    checkpoint = run.best_checkpoint("perpeft")
    config = run.config
    embeddings = load_embeddings(run)
    dataset = run_dataset(config)
    data = EvaluationData.build(leave_one_out(dataset.sequences), config.maxlen, torch.device("cpu"))
    model = load_model(run, checkpoint, config.groups, dataset.num_items)
    block = current_world().block_slice(len(data.users))
    users = torch.from_numpy(data.users[block])
    groups = embeddings.groups[users]
    vectors = {
        "valid": model.user_vectors(data.windows["valid"][block], groups, embeddings.items, config.eval_batch_size),
        "test": embeddings.users[users],
    }
    return {
        stage: full_ranking_metrics(
            vectors[stage], embeddings.items, groups, data.targets[stage][block], data.histories[stage].select(block)
        )
        for stage in ("valid", "test")
    }


KNOWN_USER: Final = "known_user"
NEAREST_CENTROID: Final = "nearest_centroid"
AssignedBy = Literal["known_user", "nearest_centroid"]  # how a query's group was chosen


@dataclass(frozen=True)
class Query:
    """One request: a known ``user`` or a new user's ``history`` (item ids, oldest first), ``k`` items, and
    item ids to ``exclude`` beside the user's own."""

    user: str | None = None
    history: Sequence[str] | None = None
    k: int = DEFAULT_K
    exclude: Sequence[str] = ()


@dataclass
class Recommendations:
    """Top-K for one user: its group and how it was assigned, the history it was read from, items best first."""

    user: str | None
    group: int
    assigned_by: AssignedBy
    history: list[str]
    items: list[str]
    titles: list[str]
    scores: list[float]


def _item_id(dataset: Dataset, item: int) -> str:
    """The original id of engine item ``item`` (≥ 1: the padding index 0 has none)."""
    name = dataset.item_ids[item]
    if name is None:
        raise ValueError(f"engine item {item} has no id: 0 is padding")
    return name


def printable(value: str) -> str:
    """``value`` as it is when printable, else quoted with escapes: an error message stays one line."""
    return value if value.isprintable() else repr(value)


def id_positions(ids: list[str | None]) -> dict[str, int]:
    """Original id → engine index (padding's None left out)."""
    return {value: position for position, value in enumerate(ids) if value is not None}


def engine_indices(ids: list[str | None] | Mapping[str, int], wanted: Sequence[str], option: str) -> np.ndarray:
    """Engine indices of the dataset ids ``wanted`` (``ids`` by engine index, or `id_positions` of them);
    InputError naming those that are unknown."""
    index = ids if isinstance(ids, Mapping) else id_positions(ids)
    unknown = [printable(value) for value in wanted if value not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InputError(f"{option}: unknown id{'s' if len(unknown) > 1 else ''} {shown}")
    return np.array([index[value] for value in wanted], dtype=np.int64)


def top_k(
    model: PerpeftModel, tables: torch.Tensor, history: np.ndarray, group: int, k: int, maxlen: int
) -> tuple[list[int], list[float]]:
    """The ``k`` best items (engine indices) for ``history`` in ``group``'s table of ``tables`` ``[C, I+1, d]``,
    its items excluded."""
    window = torch.from_numpy(last_window([history], maxlen))
    vector = model.user_vectors(window, torch.tensor([group]), tables, 1)
    hits = ExactIndex(tables).search(vector, torch.tensor([group]), [k], [history])[0]
    return hits.items, hits.scores


def check_tables(run: RunDirectory, embeddings: Embeddings, dataset: Dataset) -> None:
    """InputError (one line, naming the file) when the embeddings were not computed for this run's config
    and dataset: another group count, width, catalog or user set."""
    config = run.config
    groups, rows, users, width = config.groups, dataset.num_items + 1, dataset.num_users + 1, config.hidden
    expected = [
        (run.embedded_items, "items", embeddings.items, (groups, rows, width)),
        (run.embedded_snapshot, "items", embeddings.snapshot, (1, rows, width)),
        (run.embedded_users, "users", embeddings.users, (users, width)),
        (run.embedded_users, "groups", embeddings.groups, (users,)),
        (run.embedded_users, "centroids", embeddings.centroids, (groups, width)),
    ]
    for path, name, tensor, shape in expected:
        if tuple(tensor.shape) != shape:
            raise InputError(
                f"{path}: {name} is {list(tensor.shape)}, but the run (C = {groups}, d = {width}, "
                f"{dataset.num_items} items, {dataset.num_users} users) needs {list(shape)}; "
                f"recompute with `perpeft-engine embed --run {run.path} --overwrite`"
            )
    if int(embeddings.groups.max()) >= groups or int(embeddings.groups.min()) < 0:
        raise InputError(f"{run.embedded_users}: groups outside 0..{groups - 1}; recompute with `perpeft-engine embed`")


class ServingRun:
    """A finished PerPEFT run opened for serving: its dataset, cached tables, SASRec and snapshot SASRec,
    loaded once and checked against each other (`check_tables`), and the items added since training
    (`catalog`, after the trained ones: ``dataset`` and ``embeddings`` hold both, ``trained_dataset`` and
    ``trained_embeddings`` the run's own)."""

    def __init__(
        self,
        run: RunDirectory,
        dataset: Dataset,
        embeddings: Embeddings,
        index: str = "exact",
        catalog: Catalog | None = None,
        precompute_users: bool = True,
    ) -> None:
        self.run, self.index_kind = run, index
        self.trained_dataset, self.trained_embeddings = dataset, embeddings
        config = run.config
        self.maxlen = config.maxlen
        self.model = load_model(run, run.best_checkpoint("perpeft"), config.groups, dataset.num_items)
        self.snapshot = load_model(run, run.snapshot, 1, dataset.num_items)
        self.user_positions = id_positions(dataset.user_ids)
        # A known user's vector depends on nothing but its purchases (all in the trained catalog): a
        # service computes them all once and serves them by lookup, unchanged by added items; a one-off
        # call (`precompute_users=False`) computes those it is asked for.
        self.known_vectors = self._user_vectors(range(len(dataset.sequences))) if precompute_users else None
        catalog = catalog or Catalog.empty(config.groups, config.hidden)
        # Built (or read back) for the trained tables, then grown as a running service grows it.
        trained_index = build_index(index, embeddings.items, run.search_graphs)
        self._take_catalog(catalog, trained_index.extended(self._tables(catalog)) if catalog.items else trained_index)

    @torch.inference_mode()
    def _user_vectors(self, users: Sequence[int]) -> torch.Tensor:
        """SASRec's vectors of known ``users`` (engine indices) from everything each bought."""
        windows = torch.from_numpy(last_window([self.trained_dataset.sequences[user] for user in users], self.maxlen))
        groups = self.trained_embeddings.groups[torch.tensor(users, dtype=torch.long)]
        return self.model.user_vectors(windows, groups, self.trained_embeddings.items, self.run.config.eval_batch_size)

    def _tables(self, catalog: Catalog) -> torch.Tensor:
        """Every group's table with ``catalog``'s rows after the trained ones."""
        return torch.cat([self.trained_embeddings.items, catalog.tables], dim=1)

    def _take_catalog(self, catalog: Catalog, index: SearchIndex) -> None:
        trained = self.trained_embeddings
        self.catalog, self.index = catalog, index
        self.dataset = catalog.extend(self.trained_dataset)
        self.embeddings = dataclasses.replace(
            trained, items=index.tables, snapshot=torch.cat([trained.snapshot, catalog.snapshot], dim=1)
        )
        self.item_positions = id_positions(self.dataset.item_ids)

    def with_catalog(self, catalog: Catalog) -> "ServingRun":
        """A copy serving ``catalog`` (this one's, grown by later additions: tables are append-only, so a
        query prepared by this run stays valid there); the models, known users' vectors and the index's
        rows so far are shared, not recomputed."""
        if catalog.items[: len(self.catalog.items)] != self.catalog.items:
            raise InputError(f"{self.run.embedded_catalog}: the added items changed, not grew; restart the service")
        grown = copy.copy(self)
        grown._take_catalog(catalog, self.index.extended(grown._tables(catalog)))
        return grown

    @classmethod
    def open(cls, path: Path, index: str = "exact", precompute_users: bool = True) -> "ServingRun":
        """Open ``path`` for serving with an ``index`` (`SEARCH_INDEX`) over each group's table, items added
        since training included (``precompute_users``: every known user's vector now, as a service wants);
        InputError when it is not a finished PerPEFT run with matching embeddings."""
        run = RunDirectory.open(path)
        run.best_checkpoint("perpeft")
        embeddings = load_embeddings(run)
        dataset = run_dataset(run.config)
        check_tables(run, embeddings, dataset)
        ids = read_json(run.embedded_ids)
        if ids != {"users": dataset.user_ids, "items": dataset.item_ids}:
            raise InputError(
                f"{run.embedded_ids}: the ids differ from the run's dataset; recompute with `embed --overwrite`"
            )
        return cls(run, dataset, embeddings, index, read_catalog(run), precompute_users)

    @property
    def groups(self) -> int:
        return self.embeddings.items.shape[0]

    def prepare(self, query: Query) -> "Prepared":
        """``query`` checked and in engine indices; InputError naming the field that is wrong."""
        if (query.user is None) == (query.history is None):
            raise InputError("give exactly one of user and history")
        if query.k < 1:
            raise InputError(f"k: must be at least 1, got {query.k}")
        user = group = None
        if query.user is not None:
            user = int(engine_indices(self.user_positions, [query.user], "user")[0])
            history, group = self.dataset.sequences[user], int(self.embeddings.groups[user])
        elif not query.history:
            raise InputError("history: give at least one item id")
        else:
            history = engine_indices(self.item_positions, query.history, "history")
        excluded = engine_indices(self.item_positions, query.exclude, "exclude")
        return Prepared(query, history, user, group, np.concatenate([history, excluded]))

    @torch.inference_mode()
    def answer(self, prepared: Sequence["Prepared"]) -> list[Recommendations]:
        """Top-K of every prepared query in one batch: known users' vectors are looked up; new users take
        one pass of the snapshot's SASRec (their group) and one of PerPEFT's; then each query's search in
        its group's table."""
        groups = torch.tensor([-1 if entry.group is None else entry.group for entry in prepared], dtype=torch.long)
        known = [0 if entry.user is None else entry.user for entry in prepared]  # 0: padding, replaced below
        vectors = (
            self.known_vectors[torch.tensor(known)] if self.known_vectors is not None else self._user_vectors(known)
        )
        new = (groups < 0).nonzero().squeeze(1)
        if new.numel():
            rows = new.tolist()
            windows = torch.from_numpy(last_window([prepared[row].history for row in rows], self.maxlen))
            placed = self.snapshot.user_vectors(
                windows, torch.zeros(len(rows), dtype=torch.long), self.embeddings.snapshot, len(rows)
            )
            groups[new] = nearest_centroid(placed, self.embeddings.centroids)
            vectors[new] = self.model.user_vectors(windows, groups[new], self.embeddings.items, len(rows))
        hits = self.index.search(vectors, groups, [entry.query.k for entry in prepared], [e.exclude for e in prepared])
        titles = self.dataset.titles
        return [
            Recommendations(
                entry.query.user,
                int(group),
                NEAREST_CENTROID if entry.group is None else KNOWN_USER,
                [_item_id(self.dataset, item) for item in entry.history],
                [_item_id(self.dataset, item) for item in hit.items],
                [titles[item] for item in hit.items],
                hit.scores,
            )
            for entry, group, hit in zip(prepared, groups.tolist(), hits, strict=True)
        ]

    def recommend(self, queries: Sequence[Query]) -> list[Recommendations]:
        """Top-K of every query in one batch: InputError (naming the field) when any query is malformed."""
        return self.answer([self.prepare(query) for query in queries])


@dataclass(frozen=True)
class Prepared:
    """A checked query: its history and exclusions (history included) in engine indices, and the known
    user's engine index and group (None for a new user, placed at answer time)."""

    query: Query
    history: np.ndarray
    user: int | None
    group: int | None
    exclude: np.ndarray


def recommend(
    path: Path, k: int, user: str | None = None, history: list[str] | None = None, exclude: Sequence[str] = ()
) -> Recommendations:
    """Top-``k`` for a known ``user`` (from everything it bought) or a new user's ``history`` (oldest first),
    the user's items and ``exclude`` left out. Needs the run's embeddings (``embed``)."""
    return ServingRun.open(path, precompute_users=False).recommend([Query(user, history, k, exclude)])[0]
