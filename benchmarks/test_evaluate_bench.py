"""Full-ranking evaluation at Arts scale (24,511 users x 18,884 items, d = 32, 9 history items each).

Batched ``full_ranking_metrics`` against the authors' per-user loop (score all items, history to -inf,
argsort descending, find the target). The loop is timed on its first ``LOOP_USERS`` users only and
extrapolated linearly to all users (it is linear in users: the same work for each); ``extra_info``
records the subset, the factor and the extrapolated seconds. Acceptance: batched >= 50x the loop.

Run: ``pytest benchmarks/test_evaluate_bench.py --benchmark-enable``.
"""

import numpy as np
import pytest
import torch

from perpeft.engine.eval.metrics import CPU_RANKING_BATCH, HistoryIndex, full_ranking_metrics, target_ranks

NUM_USERS, NUM_ITEMS, DIM, HISTORY_LENGTH = 24_511, 18_884, 32, 9
LOOP_USERS = 1_000
# Users per step: a [64, I] float32 score matrix (4.8 MB) stays in cache through score, mask and count;
# on 2 CPU cores this beats the API default of 1024 (77 MB per step, also timed) by about 1.6x.
BATCH_SIZE = CPU_RANKING_BATCH


@pytest.fixture(scope="module")
def arts_scale() -> dict:
    """Random vectors with exact, distinct float32 scores, so both paths must agree bit for bit.

    Coordinates but the last are integers in [-4, 4]; the last is 1 for users and ``j / 2**15`` for
    item j: every score is ``integer + j / 2**15`` with ``|integer| <= 496 < 2**9``, exact in float32
    whatever the summation order (BLAS batched vs per-user), and no two items of a user tie.
    """
    rng = np.random.default_rng(0)
    items = rng.integers(-4, 5, size=(1, NUM_ITEMS + 1, DIM)).astype(np.float32)
    items[:, :, -1] = np.arange(NUM_ITEMS + 1) / 2**15
    users = rng.integers(-4, 5, size=(NUM_USERS, DIM)).astype(np.float32)
    users[:, -1] = 1.0
    return {
        "user_vectors": torch.from_numpy(users),
        "item_tables": torch.from_numpy(items),
        "user_groups": torch.zeros(NUM_USERS, dtype=torch.int64),
        "targets": torch.from_numpy(rng.integers(1, NUM_ITEMS + 1, size=NUM_USERS)),
        "sequences": list(rng.integers(1, NUM_ITEMS + 1, size=(NUM_USERS, HISTORY_LENGTH))),
    }


def per_user_argsort_ranks(data: dict, num_users: int) -> torch.Tensor:
    """The research scripts' evaluation: one user at a time, a full argsort each."""
    table = data["item_tables"][0]
    histories = [torch.from_numpy(seq) for seq in data["sequences"][:num_users]]
    ranks = torch.empty(num_users, dtype=torch.int64)
    for user in range(num_users):
        scores = table @ data["user_vectors"][user]
        target = data["targets"][user]
        target_score = scores[target].clone()
        scores[0] = float("-inf")
        scores[histories[user]] = float("-inf")
        scores[target] = target_score
        order = torch.argsort(scores, descending=True)
        ranks[user] = (order == target).nonzero()[0, 0]
    return ranks


def batched_evaluation(data: dict, batch_size: int) -> dict[str, float]:
    history = HistoryIndex.from_sequences(data["sequences"])
    fields = ("user_vectors", "item_tables", "user_groups", "targets")
    return full_ranking_metrics(*(data[f] for f in fields), history, batch_size=batch_size)


@pytest.mark.parametrize("batch_size", [BATCH_SIZE, 1024])
def test_batched_full_ranking_all_users(benchmark, arts_scale, batch_size):
    metrics = benchmark(batched_evaluation, arts_scale, batch_size)
    benchmark.extra_info.update(users=NUM_USERS, items=NUM_ITEMS, dim=DIM, batch_size=batch_size)
    assert 0.0 <= metrics["NDCG@10"] <= metrics["HR@10"] <= metrics["HR@30"] <= 1.0


def test_per_user_argsort_loop_first_1000_users_extrapolated(benchmark, arts_scale):
    ranks = benchmark.pedantic(per_user_argsort_ranks, args=(arts_scale, LOOP_USERS), rounds=3)
    factor = NUM_USERS / LOOP_USERS
    benchmark.extra_info.update(users_timed=LOOP_USERS, users_total=NUM_USERS, extrapolation_factor=factor)
    if benchmark.stats is not None:  # None under --benchmark-disable
        timed = benchmark.stats.stats
        benchmark.extra_info["extrapolated_all_users_min_s"] = timed.min * factor
        benchmark.extra_info["extrapolated_all_users_mean_s"] = timed.mean * factor

    subset = {f: arts_scale[f][:LOOP_USERS] for f in ("user_vectors", "user_groups", "targets")}
    history = HistoryIndex.from_sequences(arts_scale["sequences"][:LOOP_USERS])
    batched = target_ranks(**subset, item_tables=arts_scale["item_tables"], history=history, batch_size=BATCH_SIZE)
    assert torch.equal(ranks, batched)
