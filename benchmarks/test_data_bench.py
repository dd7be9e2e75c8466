"""The data layer at real scale, against the goals it was built to: loading 250,000 interactions (goal
< 1.5 s), one sampler epoch of 25,000 users with group-specific negatives (< 0.5 s) and the last windows of
50,000 sequences (< 0.5 s). Their correctness is tested in ``tests/engine/data`` at a smaller scale.

Run: ``pytest benchmarks/test_data_bench.py --benchmark-enable``.
"""

from pathlib import Path

import numpy as np
import pytest

from perpeft.engine.data.formats import load_recbole
from perpeft.engine.data.sampler import TrainSampler
from perpeft.engine.data.split import last_window

GOALS_S = {"load_recbole": 1.5, "sampler_epoch": 0.5, "last_window": 0.5}


def check_goal(benchmark: pytest.FixtureRequest, name: str) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        assert benchmark.stats["median"] < GOALS_S[name], f"{name}: median {benchmark.stats['median']:.3f} s"


@pytest.fixture(scope="module")
def interactions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RecBole directory of 2,000 items and 250,000 interactions of 25,000 users."""
    directory = tmp_path_factory.mktemp("data") / "shop"
    (directory / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = 2_000
    users, item_column, stamps = (rng.integers(0, high, size=250_000) for high in (25_000, items, 10**12))
    (directory / "shop.item").write_text(
        "item_id:token\ttitle:token_seq\n" + "".join(f"i{item}\tTitle {item}\n" for item in range(items))
    )
    rows = "".join(f"u{u}\ti{i}\t{s}\n" for u, i, s in zip(users, item_column, stamps, strict=True))
    (directory / "shop.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + rows)
    for item in range(items):
        (directory / "images" / f"i{item}.jpg").touch()
    return directory


def test_load_recbole_250k_interactions(benchmark, interactions: Path) -> None:
    dataset = benchmark(load_recbole, interactions)
    assert sum(map(len, dataset.sequences)) == 250_000
    check_goal(benchmark, "load_recbole")


def test_sampler_epoch_25k_users_group_negatives(benchmark) -> None:
    rng = np.random.default_rng(12)
    items = 15_000
    train = [np.empty(0, dtype=np.int64)] + [
        rng.integers(1, items + 1, size=rng.integers(0, 21)) for _ in range(25_000)
    ]
    groups = rng.integers(0, 8, size=len(train))
    sampler = TrainSampler(train, items, maxlen=10, batch_size=16, user_groups=groups, group_negatives=True)
    batches = benchmark(sampler.epoch, np.random.default_rng(13))
    assert len(batches) == sampler.num_batches
    check_goal(benchmark, "sampler_epoch")


def test_last_window_50k_sequences(benchmark) -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 1000, size=rng.integers(0, 30)) for _ in range(50_000)]
    window = benchmark(last_window, sequences, 10)
    assert window.shape == (50_000, 10)
    check_goal(benchmark, "last_window")
