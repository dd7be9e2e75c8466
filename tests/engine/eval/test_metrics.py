import math

import numpy as np
import pytest
import torch

from perpeft.engine.eval.metrics import HistoryIndex, full_ranking_metrics, ranking_metrics, target_ranks


def toy_case() -> dict:
    """Five users, five items, two groups; every score is u · z = ±(first coordinate of z).

    Group 0 scores items 1..5 as 5, 4, 3, 2, 1 and its padding row as 100; group 1 as 1..5 and 0.
    """
    table0 = torch.tensor([[100.0, 0.0], [5, 0], [4, 0], [3, 0], [2, 0], [1, 0]])
    table1 = torch.tensor([[0.0, 0.0], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0]])
    right, left = [1.0, 0.0], [-1.0, 0.0]
    return {
        "user_vectors": torch.tensor([right, right, right, right, left]),
        "item_tables": torch.stack([table0, table1]),
        "user_groups": torch.tensor([0, 0, 1, 1, 0]),
        "targets": torch.tensor([1, 4, 2, 1, 2]),
        "history": HistoryIndex.from_sequences(
            [
                np.array([], dtype=np.int64),  # target scores 5, beaten only by padding (100): rank 0
                np.array([1, 2]),  # target scores 2; 1, 2, 3 beat it, 1 and 2 excluded: rank 1
                np.array([0, 5, 2, 5]),  # group 1, target 2 in its own history; 3, 4 (5 excluded): rank 2
                np.array([], dtype=np.int64),  # group 1, target scores 1, all four others beat it: rank 4
                np.array([1]),  # scores negated: target -4, beaten by items 3, 4, 5 (-3, -2, -1): rank 3
            ]
        ),
    }


TOY_RANKS = [0, 1, 2, 4, 3]


def exact_random_case(num_users: int, num_items: int, dim: int, groups: int, seed: int) -> dict:
    """Random vectors whose float32 scores are exact and distinct, so any summation order agrees.

    Coordinates but the last are small integers; the last is 1 for users and ``j / 2**15`` for item j,
    so scores are ``integer + j / 2**15`` with ``|integer| < 2**9``: exact in 24 bits, distinct per item.
    """
    rng = np.random.default_rng(seed)
    tables = rng.integers(-4, 5, size=(groups, num_items + 1, dim)).astype(np.float32)
    tables[:, :, -1] = np.arange(num_items + 1) / 2**15
    users = rng.integers(-4, 5, size=(num_users, dim)).astype(np.float32)
    users[:, -1] = 1.0
    targets = rng.integers(1, num_items + 1, size=num_users)
    sequences = [rng.integers(1, num_items + 1, size=rng.integers(0, 13)) for _ in range(num_users)]
    for user in range(0, num_users, 7):  # some histories hold the target itself
        sequences[user] = np.append(sequences[user], targets[user])
    return {
        "user_vectors": torch.from_numpy(users),
        "item_tables": torch.from_numpy(tables),
        "user_groups": torch.from_numpy(rng.integers(0, groups, size=num_users)),
        "targets": torch.from_numpy(targets),
        "history": HistoryIndex.from_sequences(sequences),
    }


def per_user_reference_ranks(case: dict) -> torch.Tensor:
    """Score each user alone, mask padding and history with -inf (not the target), argsort, find it."""
    history = case["history"]
    ranks = []
    for user, vector in enumerate(case["user_vectors"]):
        scores = case["item_tables"][case["user_groups"][user]] @ vector
        target = case["targets"][user]
        target_score = scores[target].clone()
        scores[0] = float("-inf")
        scores[history.indices[history.indptr[user] : history.indptr[user + 1]]] = float("-inf")
        scores[target] = target_score
        order = torch.argsort(scores, descending=True)
        ranks.append(int((order == target).nonzero()))
    return torch.tensor(ranks)


def test_toy_ranks_exclude_history_and_padding_per_group():
    assert target_ranks(**toy_case()).tolist() == TOY_RANKS
    assert target_ranks(**toy_case(), batch_size=2).tolist() == TOY_RANKS


def test_tables_that_require_grad():
    case = toy_case()
    case["item_tables"].requires_grad_(True)
    assert target_ranks(**case).tolist() == TOY_RANKS


def test_int32_ids_and_moved_history():
    case = toy_case()
    case.update(user_groups=case["user_groups"].int(), targets=case["targets"].int(), history=case["history"].to("cpu"))
    assert target_ranks(**case).tolist() == TOY_RANKS


def test_toy_metrics_by_hand():
    metrics = full_ranking_metrics(**toy_case(), ks=(1, 3))
    assert list(metrics) == ["HR@1", "HR@3", "NDCG@1", "NDCG@3"]
    assert metrics["HR@1"] == pytest.approx(1 / 5)
    assert metrics["HR@3"] == pytest.approx(3 / 5)
    assert metrics["NDCG@1"] == pytest.approx(1 / 5)
    assert metrics["NDCG@3"] == pytest.approx((1 + 1 / math.log2(3) + 1 / 2) / 5)


def test_ranking_metrics_default_cutoffs_by_hand():
    metrics = ranking_metrics(torch.tensor([0, 3, 9, 10, 19, 25, 30, 100]))
    assert list(metrics) == ["HR@10", "HR@20", "HR@30", "NDCG@10", "NDCG@20", "NDCG@30"]
    assert all(type(value) is float for value in metrics.values())
    ndcg10 = 1 + 1 / math.log2(5) + 1 / math.log2(11)
    ndcg20 = ndcg10 + 1 / math.log2(12) + 1 / math.log2(21)
    expected = {
        "HR@10": 3 / 8,
        "HR@20": 5 / 8,
        "HR@30": 6 / 8,  # rank 30 is not inside the top 30
        "NDCG@10": ndcg10 / 8,
        "NDCG@20": ndcg20 / 8,
        "NDCG@30": (ndcg20 + 1 / math.log2(27)) / 8,
    }
    assert metrics == pytest.approx(expected)


def test_matches_per_user_reference_with_three_groups():
    case = exact_random_case(num_users=240, num_items=300, dim=8, groups=3, seed=0)
    expected = per_user_reference_ranks(case)
    assert torch.equal(target_ranks(**case, batch_size=16), expected)
    assert torch.equal(target_ranks(**case), expected)


def test_global_peft_single_table():
    case = exact_random_case(num_users=100, num_items=120, dim=6, groups=1, seed=1)
    case["user_groups"] = torch.zeros(100, dtype=torch.int64)
    assert torch.equal(target_ranks(**case, batch_size=33), per_user_reference_ranks(case))


def test_history_index_from_sequences_drops_padding():
    history = HistoryIndex.from_sequences([np.array([3, 0, 1]), np.array([], dtype=np.int64), np.array([2])])
    assert history.indptr.tolist() == [0, 2, 2, 3]
    assert history.indices.tolist() == [3, 1, 2]


@pytest.mark.parametrize(
    ("field", "value"),
    [("targets", torch.tensor([1, 4, 2, 1, 6])), ("user_groups", torch.tensor([0, 0, 1, 2, 0]))],
)
def test_rejects_out_of_range_inputs(field, value):
    case = toy_case()
    case[field] = value
    with pytest.raises(ValueError, match=field):
        target_ranks(**case)
