"""Serving from the embeddings: metrics equal metrics.json, top-K for known and new users, bad ids."""

import json
import shutil

import pytest
import torch

from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import last_window, leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.eval.users import grouping_space_vectors, nearest_centroid, user_space_vectors
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.runtime.run_directory import EMBEDDINGS, RunDirectory
from perpeft.engine.serve.embed import load_embeddings, load_model
from perpeft.engine.serve.recommend import evaluate_run, recommend


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
    assert result.scores == pytest.approx(scores[candidates[:6]].tolist(), abs=1e-5)


def test_k_beyond_the_catalog_returns_every_unbought_item(embedded_run, served):
    dataset = served["dataset"]
    result = recommend(embedded_run, 10_000, user=dataset.user_ids[1])
    assert len(result.items) == len(set(result.items)) == dataset.num_items - len(set(dataset.sequences[1].tolist()))
    assert not set(result.items) & set(result.history)
    assert result.scores == sorted(result.scores, reverse=True)


def test_new_users_join_the_groups_kmeans_gave_known_users(served):
    """The snapshot read of a user's train + validation history lands in its K-Means group."""
    run, dataset, embeddings = served["run"], served["dataset"], served["embeddings"]
    config = run.config
    snapshot = load_model(run, run.snapshot, 1, dataset.num_items, served["inputs"])
    split = leave_one_out(dataset.sequences)
    vectors = grouping_space_vectors(snapshot, split.history("test")[1:], config.maxlen)
    torch.testing.assert_close(vectors, user_space_vectors(snapshot, split, dataset.num_items, config))
    assert torch.equal(nearest_centroid(vectors, embeddings.centroids), embeddings.groups[1:])


def test_new_user_history(embedded_run, served):
    run, dataset, embeddings = served["run"], served["dataset"], served["embeddings"]
    bought = dataset.sequences[7][:4]
    history = [dataset.item_ids[item] for item in bought]
    result = recommend(embedded_run, 5, history=history)
    snapshot = load_model(run, run.snapshot, 1, dataset.num_items, served["inputs"])
    vector = grouping_space_vectors(snapshot, [bought], run.config.maxlen)
    assert result.group == int(nearest_centroid(vector, embeddings.centroids)[0])
    assert result.user is None and result.history == history and len(result.items) == 5
    assert not set(result.items) & set(history)
    assert result.scores == sorted(result.scores, reverse=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"user": "nobody"}, "--user: unknown id nobody"),
        ({"history": ["i0001", "nope", "gone"]}, "--history: unknown ids nope, gone"),
        ({"history": []}, "at least one"),
        ({}, "exactly one"),
        ({"user": "u00001", "history": ["i0001"]}, "exactly one"),
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


def test_bought_items_are_excluded_even_when_repeated(embedded_run, served):
    dataset = served["dataset"]
    item = dataset.item_ids[int(dataset.sequences[3][0])]
    result = recommend(embedded_run, 3, history=[item, item])
    assert item not in result.items and len(result.items) == 3
