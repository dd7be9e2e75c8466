"""The case study: history excluded from every list, own group = `recommend`'s ranking, test item marked."""

import shutil

import numpy as np
import pytest
import torch

from perpeft.engine.analysis.case import case_study, case_study_html, write_case_study_html
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import last_window, leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.runtime.run_directory import EMBEDDINGS, RunDirectory
from perpeft.engine.serve.embed import load_embeddings, load_model
from perpeft.engine.serve.recommend import top_k


@pytest.fixture(scope="module")
def served(embedded_run) -> dict:
    run = RunDirectory.open(embedded_run)
    run_inputs = load_run_inputs(run.config, run_dataset(run.config), progress=False)
    dataset = run_inputs.dataset
    split = leave_one_out(dataset.sequences)
    return {
        "run": run,
        "inputs": run_inputs,
        "dataset": dataset,
        "embeddings": load_embeddings(run),
        "history": split.history("test"),
        "test": split.test_target,
    }


USER = 5


def test_lists_exclude_the_history_and_the_own_group_is_recommends_ranking(embedded_run, served):
    dataset, embeddings = served["dataset"], served["embeddings"]
    history = served["history"][USER]
    case = case_study(embedded_run, dataset.user_ids[USER], k=8)
    group = int(embeddings.groups[USER])
    assert (case.group, case.other_group) == (group, 1 - group)
    assert [entry.index for entry in case.history] == history[-10:].tolist()
    assert [heading for heading, _ in case.columns] == [
        "Global PEFT",
        f"PerPEFT · own group {group}",
        f"PerPEFT · group {1 - group}",
    ]
    for _, entries in case.columns:
        assert len(entries) == 8
        assert not {entry.index for entry in entries} & set(history.tolist())
        scores = [entry.score for entry in entries]
        assert scores == sorted(scores, reverse=True)

    own = case.columns[1][1]
    model = load_model(served["run"], served["run"].best_checkpoint("perpeft"), 2, dataset.num_items)
    assert [entry.index for entry in own] == top_k(model, embeddings.items, history, group, 8, 10)[0]
    # The cached test-step user vector (`embed`) ranks the same items: evaluation's protocol.
    cached = embeddings.items[group] @ embeddings.users[USER]
    cached[0] = float("-inf")
    cached[torch.from_numpy(history)] = float("-inf")
    assert [entry.index for entry in own] == torch.topk(cached, 8).indices.tolist()
    np.testing.assert_allclose([entry.score for entry in own], torch.topk(cached, 8).values.numpy(), atol=1e-5)


def test_global_peft_column_uses_the_global_checkpoint(embedded_run, served):
    dataset = served["dataset"]
    history = served["history"][USER]
    case = case_study(embedded_run, dataset.user_ids[USER], k=5)
    model = load_model(served["run"], served["run"].best_checkpoint("global"), 1, dataset.num_items, served["inputs"])
    tables = model.item_tables(dataset.num_items, 7)
    vector = model.user_vectors(torch.from_numpy(last_window([history], 10)), torch.tensor([0]), tables, 1)[0]
    scores = tables[0] @ vector
    scores[0] = float("-inf")
    scores[torch.from_numpy(history)] = float("-inf")
    assert [entry.index for entry in case.columns[0][1]] == torch.topk(scores, 5).indices.tolist()


def test_the_test_item_is_marked_wherever_it_appears(embedded_run, served):
    dataset = served["dataset"]
    history = served["history"][USER]
    case = case_study(embedded_run, dataset.user_ids[USER], k=dataset.num_items)
    test_item = int(served["test"][USER])
    assert case.test_item == dataset.item_ids[test_item]
    assert not any(entry.purchased for entry in case.history)
    for _, entries in case.columns:
        assert len(entries) == dataset.num_items - len(set(history.tolist()))
        assert [entry.index for entry in entries if entry.purchased] == [test_item]


def test_html_page_is_self_contained(embedded_run, served, tmp_path):
    case = case_study(embedded_run, served["dataset"].user_ids[USER], k=30)
    page = case_study_html(case)
    cards = len(case.history) + sum(len(entries) for _, entries in case.columns)
    assert page.count('src="data:image/jpeg;base64,') == cards
    assert "http" not in page and "Purchased" in page
    assert all(f"<h2>{heading}</h2>" in page for heading, _ in case.columns)
    path = tmp_path / "case.html"
    write_case_study_html(case, path)
    assert path.read_text() == page
    with pytest.raises(InputError, match="--overwrite"):
        write_case_study_html(case, path)


def test_bad_requests_are_refused(embedded_run, served, tmp_path):
    user = served["dataset"].user_ids[USER]
    group = int(served["embeddings"].groups[USER])
    with pytest.raises(InputError, match="--user: unknown id nobody"):
        case_study(embedded_run, "nobody")
    with pytest.raises(InputError, match="other than the user's"):
        case_study(embedded_run, user, other_group=group)
    with pytest.raises(InputError, match="--other-group 2"):
        case_study(embedded_run, user, other_group=2)
    bare = shutil.copytree(embedded_run, tmp_path / "bare", ignore=shutil.ignore_patterns(EMBEDDINGS))
    with pytest.raises(InputError, match="perpeft-engine embed"):
        case_study(bare, user)
