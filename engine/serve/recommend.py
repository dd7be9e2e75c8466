"""Serving from a run's cached embeddings: recomputed metrics, and top-K for a known or a new user.

A known user is scored with its group's table. A new user, given as a purchase history, is placed in the
grouping space by the very Global-PEFT snapshot the grouping was fitted on (epoch E1), joins the group of
the nearest K-Means centroid (paper App. D.2.2), and is then scored like a known user of that group.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import last_window, leave_one_out
from perpeft.engine.errors import InputError
from perpeft.engine.eval.evaluation import EvaluationData
from perpeft.engine.eval.metrics import full_ranking_metrics
from perpeft.engine.eval.users import grouping_space_vectors, nearest_centroid
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import load_run_inputs
from perpeft.engine.runtime.distributed import current_world
from perpeft.engine.runtime.run_directory import RunDirectory
from perpeft.engine.serve.embed import load_embeddings, load_model


def evaluate_run(path: Path) -> dict[str, dict[str, float]]:
    """Validation and test metrics of the best PerPEFT epoch, recomputed from the embeddings with full ranking.

    Test users take their cached vectors (train + validation history); validation users are encoded from
    their train history through the cached tables with the run's SASRec. Under ``torchrun`` each rank
    ranks a block of the users and the metric sums are added over the ranks.
    """
    run = RunDirectory.open(path)
    checkpoint = run.best_checkpoint("perpeft")
    config = run.config
    embeddings = load_embeddings(run)
    dataset = run_dataset(config)
    data = EvaluationData.build(leave_one_out(dataset.sequences), config.maxlen, torch.device("cpu"))
    model = load_model(run, checkpoint, config.groups, dataset.num_items)
    block = current_world().block_slice(len(data.users))
    users = torch.from_numpy(data.users[block])
    groups = embeddings.groups[users]
    vectors = {
        "valid": model.user_vectors(data.windows["valid"][block], groups, embeddings.items, config.eval_batch_size),
        "test": embeddings.users[users],
    }
    return {
        stage: full_ranking_metrics(
            vectors[stage], embeddings.items, groups, data.targets[stage][block], data.histories[stage].select(block)
        )
        for stage in ("valid", "test")
    }


@dataclass
class Recommendations:
    """Top-K for one user: its group, the history it was read from, and items best first."""

    user: str | None
    group: int
    history: list[str]
    items: list[str]
    titles: list[str]
    scores: list[float]


def engine_indices(ids: list[str | None], wanted: list[str], option: str) -> np.ndarray:
    """Engine indices of the dataset ids ``wanted``; InputError naming those that are unknown."""
    index = {value: position for position, value in enumerate(ids) if value is not None}
    unknown = [value for value in wanted if value not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InputError(f"{option}: unknown id{'s' if len(unknown) > 1 else ''} {shown}")
    return np.array([index[value] for value in wanted], dtype=np.int64)


def top_k(
    model: PerpeftModel, tables: torch.Tensor, history: np.ndarray, group: int, k: int, maxlen: int
) -> tuple[list[int], list[float]]:
    """The ``k`` best items (engine indices) for ``history`` in ``group``'s table of ``tables`` ``[C, I+1, d]``,
    its items excluded."""
    window = torch.from_numpy(last_window([history], maxlen))
    vector = model.user_vectors(window, torch.tensor([group]), tables, 1)[0]
    scores = tables[group, 1:] @ vector
    seen = torch.from_numpy(np.unique(history)) - 1
    scores[seen] = float("-inf")
    best = torch.topk(scores, min(k, scores.numel() - seen.numel()))
    return (best.indices + 1).tolist(), best.values.tolist()


def recommend(
    path: Path, k: int, user: str | None = None, history: list[str] | None = None, progress: bool = True
) -> Recommendations:
    """Top-``k`` for a known ``user`` (from everything it bought) or a new user's ``history`` (oldest first).

    Needs the run's embeddings (``embed``). A new user also loads the item encoder, to read its history
    with the Global-PEFT snapshot.
    """
    if (user is None) == (history is None):
        raise InputError("give exactly one of --user and --history")
    run = RunDirectory.open(path)
    checkpoint = run.best_checkpoint("perpeft")
    config = run.config
    embeddings = load_embeddings(run)
    dataset = run_dataset(config)
    if user is not None:
        index = int(engine_indices(dataset.user_ids, [user], "--user")[0])
        sequence = dataset.sequences[index]
        group = int(embeddings.groups[index])
    else:
        if not history:
            raise InputError("--history: give at least one item id")
        run_inputs = load_run_inputs(config, dataset, progress)
        sequence = engine_indices(dataset.item_ids, history, "--history")
        snapshot = load_model(run, run.snapshot, 1, dataset.num_items, run_inputs)
        vector = grouping_space_vectors(snapshot, [sequence], config.maxlen)
        group = int(nearest_centroid(vector, embeddings.centroids)[0])
    model = load_model(run, checkpoint, config.groups, dataset.num_items)
    items, scores = top_k(model, embeddings.items, sequence, group, k, config.maxlen)
    return Recommendations(
        user,
        group,
        [dataset.item_ids[item] for item in sequence],
        [dataset.item_ids[item] for item in items],
        [dataset.titles[item] for item in items],
        scores,
    )
