"""Serving from the embeddings: metrics equal metrics.json, top-K for known and new users, bad ids."""

import json
import shutil

import pytest
import torch

from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import last_window, leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.eval.users import nearest_centroid, user_space_vectors
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.runtime.run_directory import EMBEDDINGS, RunDirectory
from perpeft.engine.runtime.tensors import load_tensors, save_tensors
from perpeft.engine.serve.embed import load_embeddings, load_model
from perpeft.engine.serve.recommend import Query, ServingRun, evaluate_run, recommend


@pytest.fixture(scope="module")
def served(embedded_run) -> dict:
    run = RunDirectory.open(embedded_run)
    run_inputs = load_run_inputs(run.config, run_dataset(run.config), progress=False)
    return {"run": run, "inputs": run_inputs, "dataset": run_inputs.dataset, "embeddings": load_embeddings(run)}


def test_metrics_from_embeddings_equal_metrics_json(embedded_run):
    recorded = json.loads((embedded_run / "metrics.json").read_text())["perpeft"]
    recomputed = evaluate_run(embedded_run)
    assert set(recomputed) == {"valid", "test"}
    for stage in ("valid", "test"):
        assert recomputed[stage] == pytest.approx(recorded[stage], rel=0, abs=1e-6), stage


def test_known_user_scored_from_everything_bought(embedded_run, served):
    dataset, embeddings = served["dataset"], served["embeddings"]
    user = 5
    result = recommend(embedded_run, 6, user=dataset.user_ids[user])
    bought = dataset.sequences[user]
    group = int(embeddings.groups[user])
    assert result.group == group and result.user == dataset.user_ids[user]
    assert result.history == [dataset.item_ids[item] for item in bought]

    model = load_model(served["run"], served["run"].best_checkpoint("perpeft"), 2, dataset.num_items)
    window = torch.from_numpy(last_window([bought], model.recommender.maxlen))
    vector = model.user_vectors(window, torch.tensor([group]), embeddings.items, 1)[0]
    scores = embeddings.items[group] @ vector
    candidates = sorted(set(range(1, dataset.num_items + 1)) - set(bought.tolist()), key=lambda item: -scores[item])
    assert result.items == [dataset.item_ids[item] for item in candidates[:6]]
    assert result.titles == [dataset.titles[item] for item in candidates[:6]]
    assert result.scores == pytest.approx(scores[candidates[:6]].tolist(), rel=1e-5, abs=1e-6)


def test_k_beyond_the_catalog_returns_every_unbought_item(embedded_run, served):
    dataset = served["dataset"]
    result = recommend(embedded_run, 10_000, user=dataset.user_ids[1])
    assert len(result.items) == len(set(result.items)) == dataset.num_items - len(set(dataset.sequences[1].tolist()))
    assert not set(result.items) & set(result.history)
    assert result.scores == sorted(result.scores, reverse=True)


def test_snapshot_table_is_the_grouping_space(served):
    """`embed` caches the snapshot's table exactly as the grouping read it, and through it every known user
    lands in the group K-Means gave it."""
    run, dataset, embeddings = served["run"], served["dataset"], served["embeddings"]
    config = run.config
    snapshot = load_model(run, run.snapshot, 1, dataset.num_items, served["inputs"])
    assert torch.equal(embeddings.snapshot, snapshot.item_tables(dataset.num_items, config.encode_batch_size))
    split = leave_one_out(dataset.sequences)
    windows = torch.from_numpy(last_window(split.history("test")[1:], config.maxlen))
    zeros = torch.zeros(windows.shape[0], dtype=torch.long)
    vectors = snapshot.user_vectors(windows, zeros, embeddings.snapshot, 7)
    torch.testing.assert_close(vectors, user_space_vectors(snapshot, split, dataset.num_items, config))
    assert torch.equal(nearest_centroid(vectors, embeddings.centroids), embeddings.groups[1:])


def test_new_user_history(embedded_run, served):
    run, dataset, embeddings = served["run"], served["dataset"], served["embeddings"]
    bought = dataset.sequences[7][:4]
    history = [dataset.item_ids[item] for item in bought]
    result = recommend(embedded_run, 5, history=history)
    snapshot = load_model(run, run.snapshot, 1, dataset.num_items, served["inputs"])
    window = torch.from_numpy(last_window([bought], run.config.maxlen))
    vector = snapshot.user_vectors(
        window, torch.zeros(1, dtype=torch.long), snapshot.item_tables(dataset.num_items, 9), 1
    )
    assert result.group == int(nearest_centroid(vector, embeddings.centroids)[0])
    assert result.assigned_by == "nearest_centroid"
    assert result.user is None and result.history == history and len(result.items) == 5
    assert not set(result.items) & set(history)
    assert result.scores == sorted(result.scores, reverse=True)


def test_a_batch_equals_its_queries_one_by_one(embedded_run, served):
    dataset = served["dataset"]
    serving = ServingRun.open(embedded_run)
    queries = [
        Query(user=dataset.user_ids[2], k=4),
        Query(history=[dataset.item_ids[3], dataset.item_ids[9]], k=6, exclude=[dataset.item_ids[1]]),
        Query(user=dataset.user_ids[40], k=1, exclude=[dataset.item_ids[5], dataset.item_ids[6]]),
        Query(history=[dataset.item_ids[int(item)] for item in dataset.sequences[60]], k=3),
    ]
    batch = serving.recommend(queries)
    for query, answer in zip(queries, batch, strict=True):
        alone = serving.recommend([query])[0]
        assert (answer.items, answer.group, answer.assigned_by) == (alone.items, alone.group, alone.assigned_by)
        assert answer.scores == pytest.approx(alone.scores, rel=1e-5, abs=1e-6)  # float32 sums: relative
        assert len(answer.items) == query.k and not set(answer.items) & set(query.exclude)
    assert [answer.assigned_by for answer in batch] == [
        "known_user",
        "nearest_centroid",
        "known_user",
        "nearest_centroid",
    ]


def test_exclusions_drop_exactly_those_items(embedded_run, served):
    user = served["dataset"].user_ids[5]
    plain = recommend(embedded_run, 6, user=user)
    dropped = recommend(embedded_run, 4, user=user, exclude=plain.items[:2])
    assert dropped.items == plain.items[2:]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"user": "nobody"}, "user: unknown id nobody"),
        ({"history": ["i0001", "nope", "gone"]}, "history: unknown ids nope, gone"),
        ({"history": []}, "at least one"),
        ({}, "exactly one"),
        ({"user": "u00001", "history": ["i0001"]}, "exactly one"),
        ({"user": "u00001", "exclude": ["i0001", "what"]}, "exclude: unknown id what"),
    ],
)
def test_bad_requests(embedded_run, options, message):
    with pytest.raises(InputError, match=message):
        recommend(embedded_run, 5, **options)


def test_missing_embeddings(embedded_run, tmp_path):
    copy = shutil.copytree(embedded_run, tmp_path / "run", ignore=shutil.ignore_patterns(EMBEDDINGS))
    with pytest.raises(InputError, match="embed"):
        evaluate_run(copy)
    with pytest.raises(InputError, match="embed"):
        recommend(copy, 5, user="u00001")


def test_k_below_one_is_refused(embedded_run):
    with pytest.raises(InputError, match="k: must be at least 1"):
        recommend(embedded_run, 0, user="u00001")


def test_embeddings_that_do_not_match_the_run_are_refused(embedded_run, tmp_path):
    copy = shutil.copytree(embedded_run, tmp_path / "run")
    run = RunDirectory(copy)
    items = load_tensors(run.embedded_items)[0]["items"]
    save_tensors(run.embedded_items, {"items": items[:1]})
    with pytest.raises(InputError, match=r"items\.safetensors: items is \[1, .*needs \[2, "):
        ServingRun.open(copy)
    save_tensors(run.embedded_items, {"items": items})
    run.embedded_snapshot.unlink()
    with pytest.raises(InputError, match=r"incomplete embeddings \(no snapshot\.safetensors\).*--overwrite"):
        ServingRun.open(copy)


def test_bought_items_are_excluded_even_when_repeated(embedded_run, served):
    dataset = served["dataset"]
    item = dataset.item_ids[int(dataset.sequences[3][0])]
    result = recommend(embedded_run, 3, history=[item, item])
    assert item not in result.items and len(result.items) == 3


def test_hnsw_serving_equals_exact_on_a_small_catalog(embedded_run, served):
    """48 items: the graph walk visits them all, so approximate search returns the exact top-K."""
    dataset = served["dataset"]
    queries = [Query(user=dataset.user_ids[user], k=5) for user in (1, 20, 50)]
    queries.append(Query(history=[dataset.item_ids[2], dataset.item_ids[8]], k=5, exclude=[dataset.item_ids[3]]))
    exact = ServingRun.open(embedded_run).recommend(queries)
    approximate = ServingRun.open(embedded_run, "hnsw").recommend(queries)
    assert [answer.items for answer in approximate] == [answer.items for answer in exact]
    assert [answer.group for answer in approximate] == [answer.group for answer in exact]


def test_known_users_computed_on_demand_equal_the_precomputed_ones(embedded_run, served):
    dataset = served["dataset"]
    queries = [Query(user=dataset.user_ids[user], k=8) for user in (1, 4, 9, 4)]
    queries.append(Query(history=[dataset.item_ids[3], dataset.item_ids[7]], k=8))
    precomputed = ServingRun.open(embedded_run)
    on_demand = ServingRun.open(embedded_run, precompute_users=False)
    assert on_demand.known_vectors is None and precomputed.known_vectors.shape[0] == dataset.num_users + 1
    for lookup, computed in zip(precomputed.recommend(queries), on_demand.recommend(queries), strict=True):
        assert (lookup.items, lookup.group, lookup.assigned_by) == (
            computed.items,
            computed.group,
            computed.assigned_by,
        )
        assert lookup.scores == pytest.approx(computed.scores, rel=1e-5)
