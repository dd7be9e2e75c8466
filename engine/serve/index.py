"""Maximum-inner-product search in per-group item tables (paper App. D.2): one index per group.

`ExactIndex` scores every item of a query's group table (the default: Beauty's 8 × 31,151 × 32 floats are
~32 MB, and one query is a ``[I] × d`` product). `HNSWIndex` builds one faiss HNSW graph per group for
large catalogs (optional extra ``ann``). Each query excludes its own items (history and any asked
exclusions) inside the search, so a query never gets back what it bought.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from perpeft.engine.config.choices import SEARCH_INDEX
from perpeft.engine.errors import InputError


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


class ExactIndex(SearchIndex):
    """Exact search: one product and one top-K per group present in a batch."""

    def search(
        self, vectors: torch.Tensor, groups: torch.Tensor, k: Sequence[int], exclude: Sequence[np.ndarray]
    ) -> list[Hits]:
        hits: list[Hits | None] = [None] * vectors.shape[0]
        for group in torch.unique(groups).tolist():
            rows = (groups == group).nonzero().squeeze(1).tolist()
            scores = vectors[rows] @ self.tables[group, 1:].T
            seen = [np.unique(exclude[row]) for row in rows]
            marked = torch.from_numpy(np.repeat(np.arange(len(rows)), [len(items) for items in seen]))
            scores[marked, torch.from_numpy(np.concatenate(seen)).long() - 1] = float("-inf")
            counts = [min(k[row], self.num_items - len(items)) for row, items in zip(rows, seen, strict=True)]
            best = torch.topk(scores, max(counts), dim=1)
            for position, (row, count) in enumerate(zip(rows, counts, strict=True)):
                hits[row] = Hits((best.indices[position, :count] + 1).tolist(), best.values[position, :count].tolist())
        return hits  # type: ignore[return-value]


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
    ) -> None:
        try:
            import faiss
        except ModuleNotFoundError:
            raise InputError(
                "--index hnsw needs faiss, in the optional extra 'ann': pip install -e \".[ann]\""
            ) from None
        super().__init__(tables)
        self.faiss, self.ef_search = faiss, ef_search
        self.graphs = []
        for group in range(tables.shape[0]):
            graph = faiss.IndexHNSWFlat(tables.shape[-1], neighbours, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = ef_construction
            graph.add(np.ascontiguousarray(tables[group, 1:].numpy(), dtype=np.float32))
            self.graphs.append(graph)

    def search(
        self, vectors: torch.Tensor, groups: torch.Tensor, k: Sequence[int], exclude: Sequence[np.ndarray]
    ) -> list[Hits]:
        faiss = self.faiss
        queries = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
        hits = []
        for row, group in enumerate(groups.tolist()):
            seen = np.unique(exclude[row]).astype(np.int64) - 1
            count = min(k[row], self.num_items - seen.size)
            if count <= 0:
                hits.append(Hits([], []))
                continue
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(seen))
            parameters = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, count))
            scores, ids = self.graphs[group].search(queries[row : row + 1], count, params=parameters)
            found = ids[0] >= 0
            hits.append(Hits((ids[0][found] + 1).tolist(), scores[0][found].tolist()))
        return hits


def build_index(kind: str, tables: torch.Tensor) -> SearchIndex:
    """The ``kind`` index (`SEARCH_INDEX`: exact or hnsw) over ``tables`` ``[C, I+1, d]``."""
    SEARCH_INDEX.check(kind)
    return ExactIndex(tables) if kind == "exact" else HNSWIndex(tables)
