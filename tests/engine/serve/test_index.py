"""Per-group inner-product search: the exact index against brute force, the HNSW index against the
exact one (recall), exclusions in both."""

import numpy as np
import pytest
import torch

from perpeft.engine.errors import InputError
from perpeft.engine.serve.index import ExactIndex, HNSWIndex, build_index


@pytest.fixture(scope="module")
def tables() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tables = torch.randn(3, 601, 16, generator=generator)
    tables[:, 0] = 0
    return tables


def queries(count: int, groups: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    vectors = torch.from_numpy(rng.normal(size=(count, 16)).astype(np.float32))
    chosen = torch.from_numpy(rng.integers(0, groups, count))
    exclude = [rng.integers(1, 601, rng.integers(1, 30)) for _ in range(count)]
    return vectors, chosen, exclude


def test_exact_index_is_brute_force_top_k(tables):
    vectors, groups, exclude = queries(40, 3)
    counts = [1 + row % 9 for row in range(40)]  # each query its own k, groups mixed in one batch
    hits = ExactIndex(tables).search(vectors, groups, counts, exclude)
    for vector, group, excluded, hit, k in zip(vectors, groups.tolist(), exclude, hits, counts, strict=True):
        scores = (tables[group, 1:] @ vector).tolist()
        ranked = sorted(
            (item for item in range(1, 601) if item not in set(excluded.tolist())), key=lambda i: -scores[i - 1]
        )
        assert hit.items == ranked[:k]
        assert hit.scores == pytest.approx([scores[item - 1] for item in ranked[:k]], rel=1e-5)


def test_k_beyond_what_remains_returns_every_remaining_item(tables):
    small = tables[:, :6]
    hits = ExactIndex(small).search(torch.ones(1, 16), torch.tensor([1]), [50], [np.array([2, 2, 4])])
    assert sorted(hits[0].items) == [1, 3, 5]
    approximate = HNSWIndex(small).search(torch.ones(1, 16), torch.tensor([1]), [50], [np.array([2, 2, 4])])
    assert approximate[0].items == hits[0].items


def test_hnsw_recall_against_exact_and_exclusions(tables):
    vectors, groups, exclude = queries(200, 3, seed=2)
    exact = ExactIndex(tables).search(vectors, groups, [10] * 200, exclude)
    approximate = HNSWIndex(tables).search(vectors, groups, [10] * 200, exclude)
    recall = np.mean([len(set(a.items) & set(e.items)) / 10 for a, e in zip(approximate, exact, strict=True)])
    assert recall >= 0.95
    for hit, excluded in zip(approximate, exclude, strict=True):
        assert len(hit.items) == 10 and not set(hit.items) & set(excluded.tolist())
        assert hit.scores == sorted(hit.scores, reverse=True)


def test_unknown_index_kind():
    with pytest.raises(InputError, match="--index annoy: expected one of exact, hnsw"):
        build_index("annoy", torch.zeros(1, 2, 4))


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_an_extended_index_finds_the_appended_rows_and_leaves_the_original_alone(tables, kind):
    original = build_index(kind, tables[:, :401])
    grown = original.extended(tables)
    vectors, groups, exclude = queries(20, 3, seed=4)
    expected = ExactIndex(tables).search(vectors, groups, [5] * 20, exclude)
    found = grown.search(vectors, groups, [5] * 20, exclude)
    overlap = np.mean([len(set(a.items) & set(b.items)) / 5 for a, b in zip(found, expected, strict=True)])
    assert overlap >= (1.0 if kind == "exact" else 0.9)
    assert any(item > 400 for hit in found for item in hit.items)
    within = [items[items <= 400] for items in exclude]
    assert all(item <= 400 for hit in original.search(vectors, groups, [5] * 20, within) for item in hit.items)


def test_hnsw_graphs_are_kept_on_disk_and_read_back(tables, tmp_path, monkeypatch):
    first = HNSWIndex(tables, cache=tmp_path)
    kept = sorted(tmp_path.glob("hnsw-*.faiss"))
    assert len(kept) == 3  # one graph per group

    def no_build(*args):
        raise AssertionError("built a graph that was on disk")

    with monkeypatch.context() as patch:
        patch.setattr(first.faiss, "IndexHNSWFlat", no_build)
        again = HNSWIndex(tables, cache=tmp_path)
    vectors, groups, exclude = queries(10, 3, seed=7)
    assert again.search(vectors, groups, [5] * 10, exclude) == first.search(vectors, groups, [5] * 10, exclude)
    HNSWIndex(tables * 2, cache=tmp_path)  # other rows: other graphs, beside the first ones
    assert len(list(tmp_path.glob("hnsw-*.faiss"))) == 6


def test_a_damaged_graph_on_disk_is_built_again(tables, tmp_path, caplog):
    first = HNSWIndex(tables, cache=tmp_path)
    kept = sorted(tmp_path.glob("hnsw-*.faiss"))
    kept[1].write_bytes(kept[1].read_bytes()[:100])  # cut short
    again = HNSWIndex(tables, cache=tmp_path)
    vectors, groups, exclude = queries(10, 3, seed=8)
    assert again.search(vectors, groups, [5] * 10, exclude) == first.search(vectors, groups, [5] * 10, exclude)
    warnings = [record.getMessage() for record in caplog.records if "damaged search graph" in record.getMessage()]
    assert len(warnings) == 1 and str(kept[1]) in warnings[0]
    assert kept[1].stat().st_size > 100  # written again whole
