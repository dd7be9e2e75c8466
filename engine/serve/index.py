"""Maximum-inner-product search in per-group item tables (paper App. D.2): one index per group.

`ExactIndex` scores every item of a query's group table (the default: Beauty's 8 × 31,151 × 32 floats are
~32 MB, and one query is a ``[I] × d`` product). `HNSWIndex` builds one faiss HNSW graph per group for
large catalogs (optional extra ``ann``), kept on disk for the next start. Each query excludes its own items (history and any asked
exclusions) inside the search, so a query never gets back what it bought.
"""

import copy
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perpeft.engine.config.choices import SEARCH_INDEX
from perpeft.engine.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hits:
    """One query's top-K: engine item indices (≥ 1), best first, and their inner products."""

    items: list[int]
    scores: list[float]


class SearchIndex:
    """Top-K by inner product over per-group item tables ``[C, I+1, d]`` (row 0, padding, never returned)."""

    def __init__(self, tables: torch.Tensor) -> None:
        self.tables = tables

    @property
    def num_items(self) -> int:
        return self.tables.shape[1] - 1

    def search(
        self, vectors: torch.Tensor, groups: torch.Tensor, k: Sequence[int], exclude: Sequence[np.ndarray]
    ) -> list[Hits]:
        """The ``k[n]`` best items of group ``groups[n]``'s table for each query vector ``vectors[n]``, the
        items of ``exclude[n]`` (engine indices, repeats allowed) left out; fewer when fewer remain."""
        raise NotImplementedError

    def extended(self, tables: torch.Tensor) -> "SearchIndex":
        """An index over ``tables``, which are this index's tables with rows appended (added items); this
        one is left as it is, for the requests still answered from it."""
        raise NotImplementedError

    def _exclusions(self, k: Sequence[int], exclude: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
        """Each query's distinct excluded items and how many results it gets: its k, or all that remain."""
        seen = [np.unique(items) for items in exclude]
        return seen, [min(wanted, self.num_items - len(items)) for wanted, items in zip(k, seen, strict=True)]


class ExactIndex(SearchIndex):
    """Exact search: the batch's queries ordered by group, one product per group written into one score
    matrix, then one top-K for the whole batch (per-group top-Ks cost more than the products at
    serving's sizes: a batch of new users spans most groups)."""

    def search(
        self, vectors: torch.Tensor, groups: torch.Tensor, k: Sequence[int], exclude: Sequence[np.ndarray]
    ) -> list[Hits]:
        order = np.argsort(groups.numpy(), kind="stable")
        ordered_groups = groups.numpy()[order]
        starts = np.flatnonzero(np.diff(ordered_groups, prepend=-1))
        ends = np.append(starts[1:], len(order))
        queries = vectors[torch.from_numpy(order)]
        scores = queries.new_empty(len(order), self.num_items)
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            torch.matmul(queries[start:end], self.tables[int(ordered_groups[start]), 1:].T, out=scores[start:end])
        seen, counts = self._exclusions([k[row] for row in order], [exclude[row] for row in order])
        marked = torch.from_numpy(np.repeat(np.arange(len(order)), [len(items) for items in seen]))
        scores[marked, torch.from_numpy(np.concatenate(seen)).long() - 1] = float("-inf")
        best = torch.topk(scores, max(counts), dim=1)
        items, values = (best.indices + 1).tolist(), best.values.tolist()
        hits: list[Hits | None] = [None] * len(order)
        for position, (row, count) in enumerate(zip(order.tolist(), counts, strict=True)):
            hits[row] = Hits(items[position][:count], values[position][:count])
        return hits  # type: ignore[return-value]

    def extended(self, tables: torch.Tensor) -> "ExactIndex":
        return ExactIndex(tables)


HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 100
HNSW_EF_SEARCH = 128


class HNSWIndex(SearchIndex):
    """Approximate top-K by inner product: one faiss ``IndexHNSWFlat`` graph per group over items 1..I
    (graph id ``i - 1`` is item ``i``). Exclusions are an ``IDSelector`` inside the graph walk, so k
    results come back whenever k items remain; ``ef_search`` (raised to k when smaller) trades speed for
    recall (`benchmarks/test_index_bench.py` measures recall@K against `ExactIndex`)."""

    def __init__(
        self,
        tables: torch.Tensor,
        neighbours: int = HNSW_NEIGHBOURS,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
        cache: Path | None = None,
    ) -> None:
        """With ``cache``, each group's graph is read from that directory when one was built there for the
        same rows and settings (named by their hash), and written there after it is built."""
        try:
            import faiss
        except ModuleNotFoundError:
            raise InputError(
                "--index hnsw needs faiss, in the optional extra 'ann': pip install -e \".[ann]\""
            ) from None
        super().__init__(tables)
        self.faiss, self.ef_search = faiss, ef_search
        self.graphs = [
            self._graph(tables[group, 1:], neighbours, ef_construction, cache) for group in range(len(tables))
        ]

    def _graph(self, rows: torch.Tensor, neighbours: int, ef_construction: int, cache: Path | None) -> Any:
        faiss = self.faiss
        vectors = np.ascontiguousarray(rows.numpy(), dtype=np.float32)
        path = None
        if cache is not None:
            digest = hashlib.sha256(f"{faiss.__version__} {neighbours} {ef_construction} {vectors.shape}".encode())
            digest.update(vectors.tobytes())
            path = cache / f"hnsw-{digest.hexdigest()[:24]}.faiss"
            if path.is_file():
                try:
                    kept = faiss.read_index(str(path))
                    if kept.ntotal == len(vectors) and kept.d == vectors.shape[1]:
                        return kept
                    reason = f"{kept.ntotal} × {kept.d} vectors, expected {len(vectors)} × {vectors.shape[1]}"
                except RuntimeError as error:  # faiss' error for a file it cannot read
                    reason = (str(error).strip().splitlines() or ["unreadable"])[-1]
                log.warning("warning: %s: damaged search graph (%s); building it again", path, reason)
        graph = faiss.IndexHNSWFlat(vectors.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = ef_construction
        graph.add(vectors)
        if path is not None:
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                faiss.write_index(graph, str(temporary))
                os.replace(temporary, path)
            except (RuntimeError, OSError) as error:  # a full disk: serve without keeping the graph
                temporary.unlink(missing_ok=True)
                log.warning("warning: %s: cannot keep the search graph (%s); it is built again next start", path, error)
        return graph

    def extended(self, tables: torch.Tensor) -> "HNSWIndex":
        """Copies of this index's graphs with the new rows inserted: the old rows are not re-indexed."""
        grown = copy.copy(self)
        grown.tables = tables
        grown.graphs = [self.faiss.clone_index(graph) for graph in self.graphs]
        for group, graph in enumerate(grown.graphs):
            graph.add(np.ascontiguousarray(tables[group, self.num_items + 1 :].numpy(), dtype=np.float32))
        return grown

    def search(
        self, vectors: torch.Tensor, groups: torch.Tensor, k: Sequence[int], exclude: Sequence[np.ndarray]
    ) -> list[Hits]:
        faiss = self.faiss
        queries = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
        hits = []
        for row, (group, seen, count) in enumerate(zip(groups.tolist(), *self._exclusions(k, exclude), strict=True)):
            if count <= 0:
                hits.append(Hits([], []))
                continue
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(seen.astype(np.int64) - 1))
            parameters = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, count))
            scores, ids = self.graphs[group].search(queries[row : row + 1], count, params=parameters)
            found = ids[0] >= 0
            hits.append(Hits((ids[0][found] + 1).tolist(), scores[0][found].tolist()))
        return hits


def build_index(kind: str, tables: torch.Tensor, cache: Path | None = None) -> SearchIndex:
    """The ``kind`` index (`SEARCH_INDEX`: exact or hnsw) over ``tables`` ``[C, I+1, d]``; an HNSW index keeps
    its graphs in ``cache`` (when given) for the next start."""
    SEARCH_INDEX.check(kind)
    return ExactIndex(tables) if kind == "exact" else HNSWIndex(tables, cache=cache)
