"""Shared fixtures: one cache directory per test session, and one small trained demo run."""

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from benchmarks.catalog_update import write_item_copies
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.embed import embed_run
from perpeft.engine.train.pipeline import train_new_run

SMALL_DEMO = DemoSpec(num_domains=2, num_users=96, items_per_domain=24, min_seq_len=5, max_seq_len=8)


def _assert_learned(run: Path, beats_chance: bool = True, k: int = 10) -> None:
    """The run learned: its training loss fell from the first epoch to the last and, with ``beats_chance``,
    the reported stage's validation HR@k is clearly above what a random ranking of this catalog scores —
    more than 3 standard deviations of a random ranking's hit count above its mean, where user u's target
    is a hit with probability k / (the catalog less u's other history items), computed here from the data."""
    directory = RunDirectory.open(run)
    metrics, state = directory.read_metrics(), directory.read_state()
    losses = [record.loss for stage in state.stages.values() for record in stage.history]
    assert losses[0] > losses[-1], f"the training loss did not fall: {losses}"
    if not beats_chance:
        return
    dataset = run_dataset(directory.config)
    split = leave_one_out(dataset.sequences)
    history = split.history("valid")
    chances = np.array(
        [
            min(1.0, k / (dataset.num_items - len(set(history[user].tolist()) - {split.valid_target[user]})))
            for user in split.eval_users
        ]
    )
    hits = metrics[metrics["result"]]["valid"][f"HR@{k}"] * len(chances)
    spread = float(np.sqrt((chances * (1 - chances)).sum()))
    assert hits > chances.sum() + 3 * spread, (
        f"validation HR@{k} {hits / len(chances):.3f}: within 3 SD of chance {chances.mean():.3f} "
        f"(SD {spread / len(chances):.3f})"
    )


@pytest.fixture(scope="session")
def assert_learned() -> Callable[..., None]:
    """``assert_learned(run, beats_chance=True)``: the run's loss fell and its validation HR@10 is clearly
    above chance."""
    return _assert_learned


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("perpeft-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("PERPEFT_CACHE", str(cache))
    yield cache
    patch.undo()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-domain, 96-user demo dataset directory (read-only for tests)."""
    return generate_demo(tmp_path_factory.mktemp("data") / "shop", seed=3, spec=SMALL_DEMO)


@pytest.fixture(scope="session")
def small_config() -> Callable[..., RunConfig]:
    """``small_config(data, **changes)``: a run configuration that trains in seconds."""

    def make(data: Path, **changes: object) -> RunConfig:
        settings = dict(
            data=str(data), clip="tiny", groups=2, epochs_global=1, epochs_perpeft=1, lr=1e-3, weight_decay=1e-4
        )
        return RunConfig(**{**settings, **changes})

    return make


@pytest.fixture(scope="session")
def _trained_run(small_demo: Path, small_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run, _ = train_new_run(
        small_config(small_demo), tmp_path_factory.mktemp("trained") / "run", False, lambda line: None, False
    )
    return run.path


@pytest.fixture(scope="module")
def demo_run(_trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of one small trained run (E1 = E2 = 1, C = 2), free to modify."""
    copy = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(_trained_run, copy)
    return copy


@pytest.fixture(scope="module")
def embedded_run(demo_run: Path) -> Path:
    """``demo_run`` with its embeddings computed (`embed`), as serving and the case study read them."""
    embed_run(demo_run, progress=False)
    return demo_run


@pytest.fixture(scope="session")
def item_copies() -> Callable[..., tuple[Path, list[str]]]:
    """``item_copies(run, directory, rows, prefix="new")``: `benchmarks.catalog_update.write_item_copies`,
    an item file of copies of the run's trained items ``rows`` under new ids."""

    def make(run: Path, directory: Path, rows: list[int], prefix: str = "new") -> tuple[Path, list[str]]:
        return write_item_copies(run, directory, rows, prefix)

    return make


@pytest.fixture
def embedded_copy(embedded_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``embedded_run`` for one test, free to add items to."""
    copy = tmp_path / "run"
    shutil.copytree(embedded_run, copy)
    return copy
