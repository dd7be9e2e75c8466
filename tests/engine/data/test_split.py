import numpy as np
import pytest

from perpeft.engine.data.split import Split, last_window, leave_one_out


def arrays(*sequences: list[int]) -> list[np.ndarray]:
    return [np.array(sequence, dtype=np.int64) for sequence in sequences]


@pytest.fixture
def toy() -> Split:
    # Users 1..4 with 1, 2, 3 and 5 items.
    return leave_one_out(arrays([], [7], [4, 9], [1, 2, 3], [5, 6, 7, 8, 9]))


def test_leave_one_out_holds_out_last_two_items(toy: Split) -> None:
    assert [list(sequence) for sequence in toy.train] == [[], [7], [4, 9], [1], [5, 6, 7]]
    assert list(toy.valid_target) == [0, 0, 0, 2, 8]
    assert list(toy.test_target) == [0, 0, 0, 3, 9]
    assert all(sequence.dtype == np.int64 for sequence in toy.train)
    assert toy.valid_target.dtype == toy.test_target.dtype == np.int64


def test_eval_users_are_those_with_targets(toy: Split) -> None:
    assert toy.eval_users.dtype == np.int64
    assert list(toy.eval_users) == [3, 4]


def test_history_adds_the_validation_item_for_test(toy: Split) -> None:
    assert [list(sequence) for sequence in toy.history("valid")] == [[], [7], [4, 9], [1], [5, 6, 7]]
    assert [list(sequence) for sequence in toy.history("test")] == [[], [7], [4, 9], [1, 2], [5, 6, 7, 8]]
    assert [list(sequence) for sequence in toy.train] == [[], [7], [4, 9], [1], [5, 6, 7]]
    with pytest.raises(ValueError, match="stage"):
        toy.history("train")  # type: ignore[arg-type]


def test_padding_user_is_never_evaluated() -> None:
    split = leave_one_out(arrays([1, 2, 3], [4, 5, 6]))
    assert list(split.train[0]) == []
    assert list(split.eval_users) == [1]


def test_last_window_pads_left_and_keeps_the_most_recent_items() -> None:
    window = last_window(arrays([], [7], [1, 2, 3], [1, 2, 3, 4, 5, 6]), maxlen=4)
    assert window.dtype == np.int64
    assert window.tolist() == [[0, 0, 0, 0], [0, 0, 0, 7], [0, 1, 2, 3], [3, 4, 5, 6]]


def test_last_window_edge_cases() -> None:
    assert last_window([], maxlen=3).shape == (0, 3)
    assert last_window(arrays([], []), maxlen=2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="maxlen"):
        last_window(arrays([1]), maxlen=0)


def test_last_window_matches_a_plain_loop() -> None:
    """(Its speed at 50,000 sequences: benchmarks/test_data_bench.py.)"""
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 1000, size=rng.integers(0, 30)) for _ in range(5_000)]
    window = last_window(sequences, maxlen=10)
    for row in range(len(sequences)):
        tail = sequences[row][-10:]
        assert window[row].tolist() == [0] * (10 - len(tail)) + tail.tolist()
