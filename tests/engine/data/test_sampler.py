import numpy as np
import pytest

from perpeft.engine.data.sampler import Batch, TrainSampler


def random_train(rng: np.random.Generator, users: int, items: int, max_length: int) -> list[np.ndarray]:
    return [np.empty(0, dtype=np.int64)] + [
        rng.integers(1, items + 1, size=rng.integers(0, max_length + 1)) for _ in range(users)
    ]


def assert_no_own_items(batches: list[Batch], train: list[np.ndarray]) -> None:
    for batch in batches:
        for user, negatives, positives in zip(batch.users, batch.neg, batch.pos, strict=True):
            real = positives > 0
            assert np.all(negatives[real] > 0)
            assert not np.isin(negatives[real], train[user]).any(), f"user {user} got own item"


def test_shapes_padding_and_sequences() -> None:
    train = [np.empty(0, dtype=np.int64), np.array([3, 1]), np.array([5]), np.array([1, 2, 3, 4, 5, 6])]
    sampler = TrainSampler(train, num_items=20, maxlen=4, batch_size=8)
    (batch,) = sampler.epoch(np.random.default_rng(0))
    assert batch.group == -1
    assert batch.users.dtype == batch.seq.dtype == batch.pos.dtype == batch.neg.dtype == np.int64
    assert batch.seq.shape == batch.pos.shape == batch.neg.shape == (2, 4)
    rows = {int(user): index for index, user in enumerate(batch.users)}
    assert set(rows) == {1, 3}  # user 2 has a single training item
    assert batch.seq[rows[1]].tolist() == [0, 0, 0, 3]
    assert batch.pos[rows[1]].tolist() == [0, 0, 0, 1]
    assert batch.seq[rows[3]].tolist() == [2, 3, 4, 5]
    assert batch.pos[rows[3]].tolist() == [3, 4, 5, 6]
    assert batch.neg[rows[1]][:3].tolist() == [0, 0, 0]
    assert (batch.neg[batch.pos > 0] > 0).all()
    assert_no_own_items([batch], train)


def test_global_epoch_covers_every_eligible_user_once() -> None:
    rng = np.random.default_rng(1)
    train = random_train(rng, users=103, items=50, max_length=8)
    sampler = TrainSampler(train, num_items=50, maxlen=5, batch_size=10)
    batches = sampler.epoch(np.random.default_rng(2))
    users = np.concatenate([batch.users for batch in batches])
    eligible = [user for user in range(1, len(train)) if len(train[user]) >= 2]
    assert sorted(users.tolist()) == eligible
    assert len(batches) == sampler.num_batches == -(-len(eligible) // 10)
    assert all(len(batch.users) <= 10 for batch in batches)
    for batch in batches:
        assert ((batch.seq == 0) == (batch.pos == 0)).all()
        assert (batch.neg[batch.pos == 0] == 0).all()
    assert_no_own_items(batches, train)


def test_same_seed_same_batches_and_different_seed_differs() -> None:
    train = random_train(np.random.default_rng(3), users=60, items=40, max_length=10)
    groups = np.random.default_rng(4).integers(0, 3, size=len(train))
    sampler = TrainSampler(train, num_items=40, maxlen=6, batch_size=7, user_groups=groups, group_negatives=True)

    def flat(batches: list[Batch]) -> list[list[int]]:
        return [[batch.group, *batch.users, *batch.seq.ravel(), *batch.neg.ravel()] for batch in batches]

    first = flat(sampler.epoch(np.random.default_rng(5)))
    assert first == flat(sampler.epoch(np.random.default_rng(5)))
    assert first != flat(sampler.epoch(np.random.default_rng(6)))


def test_group_batches_are_homogeneous_and_negatives_come_from_the_group() -> None:
    rng = np.random.default_rng(7)
    items = 200
    groups = rng.integers(0, 4, size=301)
    # Each group buys from its own band of items, so I_c differ and a cross-group negative would show.
    train = [np.empty(0, dtype=np.int64)] + [
        rng.integers(40 * group + 1, 40 * group + 61, size=rng.integers(0, 9)) for group in groups[1:]
    ]
    sampler = TrainSampler(train, items, maxlen=5, batch_size=8, user_groups=groups, group_negatives=True)
    batches = sampler.epoch(np.random.default_rng(8))
    pools = {
        group: set(np.concatenate([train[user] for user in range(1, len(train)) if groups[user] == group]).tolist())
        for group in range(4)
    }
    eligible = {user: groups[user] for user in range(1, len(train)) if len(train[user]) >= 2}
    assert sorted(np.concatenate([batch.users for batch in batches]).tolist()) == sorted(eligible)
    for group in range(4):
        in_group = [batch for batch in batches if batch.group == group]
        members = sum(group_of == group for group_of in eligible.values())
        assert len(in_group) == -(-members // 8)
    assert len(batches) == sampler.num_batches
    assert [batch.group for batch in batches] != sorted(batch.group for batch in batches)  # batches shuffled
    for batch in batches:
        assert {int(groups[user]) for user in batch.users} == {batch.group}
        assert set(batch.neg[batch.pos > 0].tolist()) <= pools[batch.group]
    assert_no_own_items(batches, train)


def test_group_mode_with_global_negatives_uses_all_items() -> None:
    rng = np.random.default_rng(9)
    groups = np.array([0] + [1] * 50 + [2] * 50)
    train = [np.empty(0, dtype=np.int64)] + [rng.integers(1, 6, size=6) for _ in range(100)]
    sampler = TrainSampler(train, num_items=100, maxlen=5, batch_size=16, user_groups=groups)
    negatives = np.concatenate([batch.neg.ravel() for batch in sampler.epoch(np.random.default_rng(10))])
    assert negatives.max() > 5  # items 6..100 appear in no training sequence, yet are valid negatives
    assert_no_own_items(sampler.epoch(np.random.default_rng(11)), train)


def test_adversarial_pool_mostly_the_users_own_items() -> None:
    # Group 0's pool is items 1..30; user 1 owns 1..29, so item 30 is its only valid group negative.
    owned = np.arange(1, 30)
    train = [np.empty(0, dtype=np.int64), owned, np.array([30, 1, 30])]
    groups = np.array([0, 0, 0])
    sampler = TrainSampler(train, num_items=1000, maxlen=40, batch_size=4, user_groups=groups, group_negatives=True)
    for seed in range(5):
        (batch,) = sampler.epoch(np.random.default_rng(seed))
        row = batch.users.tolist().index(1)
        assert set(batch.neg[row][batch.pos[row] > 0].tolist()) == {30}
        assert_no_own_items([batch], train)


def test_adversarial_global_pool_nearly_full() -> None:
    train = [np.empty(0, dtype=np.int64), np.arange(1, 50), np.arange(2, 51)]
    sampler = TrainSampler(train, num_items=50, maxlen=60, batch_size=2)
    (batch,) = sampler.epoch(np.random.default_rng(0))
    expected = {1: {50}, 2: {1}}
    for user, negatives, positives in zip(batch.users, batch.neg, batch.pos, strict=True):
        assert set(negatives[positives > 0].tolist()) == expected[int(user)]


def test_exhausted_group_pool_falls_back_to_all_items_outside_the_sequence() -> None:
    # User 1 is alone in group 1, so I_1 is exactly its own items.
    train = [np.empty(0, dtype=np.int64), np.array([1, 2, 3]), np.array([4, 5])]
    groups = np.array([0, 1, 2])
    sampler = TrainSampler(train, num_items=6, maxlen=3, batch_size=1, user_groups=groups, group_negatives=True)
    negatives = {1: set(), 2: set()}
    for seed in range(20):
        for batch in sampler.epoch(np.random.default_rng(seed)):
            negatives[int(batch.users[0])] |= set(batch.neg[batch.pos > 0].tolist())
    assert negatives[1] == {4, 5, 6}
    assert negatives[2] == {1, 2, 3, 6}


def test_user_owning_every_item_is_rejected() -> None:
    with pytest.raises(ValueError, match="every item"):
        TrainSampler([np.empty(0, dtype=np.int64), np.array([1, 2, 3])], num_items=3, maxlen=3, batch_size=1)


def test_invalid_arguments() -> None:
    train = [np.empty(0, dtype=np.int64), np.array([1, 2])]
    with pytest.raises(ValueError, match=r"1\.\.5"):
        TrainSampler([np.empty(0, dtype=np.int64), np.array([1, 9])], num_items=5, maxlen=3, batch_size=1)
    with pytest.raises(ValueError, match="user_groups"):
        TrainSampler(train, num_items=5, maxlen=3, batch_size=1, group_negatives=True)
    with pytest.raises(ValueError, match="entries"):
        TrainSampler(train, num_items=5, maxlen=3, batch_size=1, user_groups=np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="positive"):
        TrainSampler(train, num_items=5, maxlen=3, batch_size=0)


def test_an_epoch_of_many_users_with_group_negatives_has_no_own_items() -> None:
    """(Its speed at 25,000 users: benchmarks/test_data_bench.py.)"""
    rng = np.random.default_rng(12)
    items = 1_500
    train = random_train(rng, users=2_500, items=items, max_length=20)
    groups = rng.integers(0, 8, size=len(train))
    sampler = TrainSampler(train, items, maxlen=10, batch_size=16, user_groups=groups, group_negatives=True)
    batches = sampler.epoch(np.random.default_rng(13))
    assert len(batches) == sampler.num_batches
    assert_no_own_items(batches, train)


def test_all_windows_cover_every_training_target_once_in_non_overlapping_windows() -> None:
    rng = np.random.default_rng(4)
    train = random_train(rng, users=40, items=300, max_length=37)
    sampler = TrainSampler(train, num_items=300, maxlen=5, batch_size=7, windows="all")
    batches = sampler.epoch(np.random.default_rng(1))
    assert sum(len(batch.users) for batch in batches) == sampler.num_rows
    assert len(batches) == sampler.num_batches
    covered: dict[int, list[tuple[list[int], list[int]]]] = {}
    for batch in batches:
        for user, seq, pos in zip(batch.users.tolist(), batch.seq, batch.pos, strict=True):
            covered.setdefault(user, []).append((seq[pos > 0].tolist(), pos[pos > 0].tolist()))
    eligible = [user for user in range(1, len(train)) if len(train[user]) >= 2]
    assert sorted(covered) == eligible
    for user in eligible:
        sequence = train[user].tolist()
        windows = sorted(covered[user], key=lambda window: len(window[0]))
        # Every target (position 1..L-1) exactly once, each with the items just before it as input.
        assert sorted(target for _, targets in windows for target in targets) == sorted(sequence[1:])
        assert len(windows) == -(-(len(sequence) - 1) // 5)
        assert all(len(inputs) == 5 for inputs, _ in windows[1:])  # only the oldest window is short
        starts = {len(sequence) - 1 - 5 * (k + 1) for k in range(len(windows))}
        spans = [(max(start, 0), start + 5) for start in starts]
        expected = sorted((sequence[low:high], sequence[low + 1 : high + 1]) for low, high in spans)
        assert sorted(windows) == expected
    assert_no_own_items(batches, train)


def test_last_windows_are_all_windows_of_histories_no_longer_than_maxlen_plus_one() -> None:
    rng = np.random.default_rng(5)
    train = random_train(rng, users=30, items=50, max_length=6)
    last = TrainSampler(train, num_items=50, maxlen=5, batch_size=4).epoch(np.random.default_rng(2))
    every = TrainSampler(train, num_items=50, maxlen=5, batch_size=4, windows="all").epoch(np.random.default_rng(2))
    for mine, theirs in zip(last, every, strict=True):
        for field in ("users", "seq", "pos", "neg"):
            np.testing.assert_array_equal(getattr(mine, field), getattr(theirs, field))


def test_all_windows_keep_group_batches_and_group_negatives() -> None:
    rng = np.random.default_rng(6)
    train = random_train(rng, users=24, items=60, max_length=30)
    groups = np.concatenate([[0], rng.integers(0, 3, size=24)])
    sampler = TrainSampler(train, 60, 4, 5, user_groups=groups, group_negatives=True, windows="all")
    batches = sampler.epoch(np.random.default_rng(3))
    assert len(batches) == sampler.num_batches
    for batch in batches:
        assert (groups[batch.users] == batch.group).all()
        pool = np.unique(np.concatenate([train[user] for user in np.flatnonzero(groups == batch.group) if user]))
        assert np.isin(batch.neg[batch.pos > 0], pool).all()
    assert_no_own_items(batches, train)


def test_prefix_rows_are_one_target_each_after_its_full_context() -> None:
    rng = np.random.default_rng(7)
    train = random_train(rng, users=20, items=200, max_length=25)
    sampler = TrainSampler(train, num_items=200, maxlen=6, batch_size=9, windows="prefix")
    batches = sampler.epoch(np.random.default_rng(0))
    seen: dict[int, list[tuple[list[int], int]]] = {}
    for batch in batches:
        assert (batch.pos[:, :-1] == 0).all() and (batch.neg[:, :-1] == 0).all() and (batch.pos[:, -1] > 0).all()
        for user, seq, pos in zip(batch.users.tolist(), batch.seq, batch.pos, strict=True):
            seen.setdefault(user, []).append((seq[seq > 0].tolist(), int(pos[-1])))
    for user in range(1, len(train)):
        sequence = train[user].tolist()
        expected = [(sequence[max(0, stop - 6) : stop], sequence[stop]) for stop in range(1, len(sequence))]
        assert sorted(seen.get(user, [])) == sorted(expected)
    assert sampler.num_rows == sum(max(len(sequence) - 1, 0) for sequence in train[1:])
    assert_no_own_items(batches, train)
