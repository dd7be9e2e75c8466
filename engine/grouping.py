"""User grouping (paper §3.2.2): Global-PEFT user vectors, K-Means (or GMM, App. C.4.3, or random, the
Table 3 ablation), centroids, nearest-centroid assignment."""

from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from .config import RunConfig
from .data.split import Split, last_window
from .distributed import current_world
from .errors import InputError

if TYPE_CHECKING:
    from .train import PerpeftModel

KMEANS_MAX_ITER = 100
RANDOM_GROUPING_STREAM = 7  # a seed-sequence key of its own, apart from training's (seed, stage, epoch)


def grouping_histories(split: Split) -> list[np.ndarray]:
    """Each user's history for grouping: train + validation item (the authors feed train+valid)."""
    return split.history("test")


def user_space_vectors(model: "PerpeftModel", split: Split, num_items: int, config: RunConfig) -> torch.Tensor:
    """SASRec's last-position output of a single-group (Global PEFT) model for users 1..U: ``[U, d]``."""
    model.eval()
    device = model.recommender.item_embeddings.weight.device
    tables = model.item_tables(num_items, config.encode_batch_size)
    windows = torch.from_numpy(last_window(grouping_histories(split)[1:], config.maxlen)).to(device)
    zeros = torch.zeros(windows.shape[0], dtype=torch.long, device=device)
    users = torch.arange(1, windows.shape[0] + 1)
    return model.gathered_user_vectors(windows, zeros, tables, config.eval_batch_size, users)


def fit_groups(
    model: "PerpeftModel", split: Split, num_items: int, config: RunConfig
) -> tuple[np.ndarray, torch.Tensor]:
    """Group users on their Global-PEFT vectors: assignment ``[U+1]`` (entry 0 unused) and centroids ``[C, d]``.

    ``kmeans``: scikit-learn K-Means (C clusters, max_iter 100, seeded). ``gmm``: a seeded Gaussian mixture
    (full covariances); its centroids are the component means. ``--grouping random``: a seeded balanced
    random assignment; its centroids are the groups' mean vectors. New users always join the nearest
    centroid (K-Means' rule; for a GMM this ignores the covariances).
    """
    vectors = user_space_vectors(model, split, num_items, config).float().cpu().numpy()
    if vectors.shape[0] < config.groups:
        raise InputError(f"--groups {config.groups}: only {vectors.shape[0]} users to group")
    world = current_world()
    labels, centroids = _cluster(vectors, config) if world.is_main else (None, None)
    if not world.alone:  # clustered once, on rank 0; every rank gets its result
        labels = world.broadcast(
            torch.as_tensor(labels) if world.is_main else torch.zeros(len(vectors), dtype=torch.long)
        )
        shape = (config.groups, vectors.shape[1])
        centroids = world.broadcast(torch.as_tensor(centroids) if world.is_main else torch.zeros(shape))
        labels, centroids = labels.numpy(), centroids.numpy()
    assignment = np.concatenate([[0], labels]).astype(np.int64)
    return assignment, torch.from_numpy(np.asarray(centroids, dtype=np.float32))


def _cluster(vectors: np.ndarray, config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``[U]`` (int64) and centroids ``[C, d]`` (float32) of the configured grouping."""
    seed = config.stage_seed("grouping")
    if config.grouping == "random":
        rng = np.random.default_rng([seed, RANDOM_GROUPING_STREAM])
        labels = rng.permutation(np.arange(vectors.shape[0]) % config.groups)
        centroids = np.stack([vectors[labels == group].mean(axis=0) for group in range(config.groups)])
    elif config.clustering == "gmm":
        mixture = GaussianMixture(n_components=config.groups, max_iter=KMEANS_MAX_ITER, random_state=seed)
        labels = mixture.fit_predict(vectors)
        centroids = mixture.means_
    else:
        kmeans = KMeans(n_clusters=config.groups, max_iter=KMEANS_MAX_ITER, random_state=seed, n_init="auto")
        labels = kmeans.fit_predict(vectors)
        centroids = kmeans.cluster_centers_
    return np.asarray(labels, dtype=np.int64), np.asarray(centroids, dtype=np.float32)


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the (Euclidean) nearest centroid of each vector: K-Means' assignment rule."""
    return torch.cdist(vectors, centroids).argmin(dim=1)
