"""Per-group top-K search, exact against approximate, on one thread: query latency, build time, recall@10.

Two catalogs of 32-d item vectors drawn around 2,000 interest centres (structure like a trained item table,
which random Gaussian vectors lack): 8 groups × 18,884 items (the paper's Arts size) and one group of
1,000,000 items. Queries come from the same centres; each excludes 10 items of its top-50 (a user's
history). Backends: `ExactIndex` (the service's default), `HNSWIndex` (faiss HNSW, M = 32,
efConstruction = 100, efSearch = 128, exclusions as an IDSelector inside the walk), and usearch's HNSW
(the same M and expansions; exclusions by over-fetching k + |excluded| and filtering, as it has no
selector on this path), the two candidates the service could use. ``extra_info`` holds recall@10 against
exact search and the build seconds.

    pytest benchmarks/test_index_bench.py --benchmark-enable -s
"""

import time

import numpy as np
import pytest
import torch

from perpeft.engine.serve.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_NEIGHBOURS, ExactIndex, HNSWIndex

CATALOGS = {"arts-8x18884": (8, 18_884), "1-group-1M": (1, 1_000_000)}
QUERIES = 200
K = 10


def catalog(groups: int, items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, 32)).astype(np.float32)
    tables = np.zeros((groups, items + 1, 32), dtype=np.float32)
    for group in range(groups):
        tables[group, 1:] = centres[rng.integers(0, 2000, items)] + 0.5 * rng.normal(size=(items, 32))
    vectors = centres[rng.integers(0, 2000, QUERIES)] + 0.5 * rng.normal(size=(QUERIES, 32))
    query_groups = rng.integers(0, groups, QUERIES)
    return torch.from_numpy(tables), torch.from_numpy(vectors.astype(np.float32)), torch.from_numpy(query_groups)


class USearchIndex:
    """usearch's HNSW per group, filtered by over-fetching (the alternative measured beside faiss)."""

    def __init__(self, tables: torch.Tensor) -> None:
        from usearch.index import Index

        self.graphs = []
        for group in range(tables.shape[0]):
            graph = Index(
                ndim=tables.shape[-1],
                metric="ip",
                dtype="f32",
                connectivity=HNSW_NEIGHBOURS,
                expansion_add=HNSW_EF_CONSTRUCTION,
                expansion_search=HNSW_EF_SEARCH,
            )
            graph.add(np.arange(1, tables.shape[1]), tables[group, 1:].numpy(), threads=1)
            self.graphs.append(graph)

    def search(self, vectors, groups, k, exclude):
        hits = []
        for row, group in enumerate(groups.tolist()):
            excluded = set(exclude[row].tolist())
            found = self.graphs[group].search(vectors[row].numpy(), k[row] + len(excluded), threads=1)
            hits.append([int(key) for key in found.keys if int(key) not in excluded][: k[row]])
        return hits


def build(backend: str, tables: torch.Tensor):
    if backend == "exact":
        return ExactIndex(tables)
    if backend == "faiss-hnsw":
        return HNSWIndex(tables)
    return USearchIndex(tables)


@pytest.fixture(scope="module", params=list(CATALOGS))
def problem(request):
    torch.set_num_threads(1)
    tables, vectors, groups = catalog(*CATALOGS[request.param])
    exact = ExactIndex(tables)
    top = exact.search(vectors, groups, [50] * QUERIES, [np.array([], dtype=np.int64)] * QUERIES)
    exclude = [np.array(hit.items[::5], dtype=np.int64) for hit in top]
    truth = [hit.items for hit in exact.search(vectors, groups, [K] * QUERIES, exclude)]
    return request.param, tables, vectors, groups, exclude, truth


@pytest.mark.parametrize("backend", ["exact", "faiss-hnsw", "usearch-hnsw"])
def test_index_search(benchmark, problem, backend):
    import faiss

    faiss.omp_set_num_threads(1)
    name, tables, vectors, groups, exclude, truth = problem
    started = time.perf_counter()
    index = build(backend, tables)
    build_seconds = time.perf_counter() - started

    def one_query_at_a_time():
        return [
            index.search(vectors[row : row + 1], groups[row : row + 1], [K], [exclude[row]])[0]
            for row in range(QUERIES)
        ]

    found = benchmark(one_query_at_a_time)
    items = [hit.items if hasattr(hit, "items") else hit for hit in found]
    recall = float(np.mean([len(set(got) & set(want)) / K for got, want in zip(items, truth, strict=True)]))
    excluded_returned = sum(bool(set(got) & set(ex.tolist())) for got, ex in zip(items, exclude, strict=True))
    benchmark.extra_info.update(
        {"catalog": name, "queries": QUERIES, "recall_at_10": recall, "build_seconds": build_seconds}
    )
    print(f"\n{name} {backend}: recall@10 {recall:.3f}, build {build_seconds:.1f} s")
    assert excluded_returned == 0
