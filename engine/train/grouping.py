"""User grouping (paper §3.2.2): K-Means (or GMM, App. C.4.3, or random, the Table 3 ablation) over the
Global-PEFT user vectors. `cluster_users` is a pure function of the vectors; `fit_groups` computes the
vectors of a model and shares rank 0's clustering with every rank."""

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.split import Split
from perpeft.engine.errors import InputError, RunError
from perpeft.engine.eval.users import user_space_vectors
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime.distributed import current_world

KMEANS_MAX_ITER = 100
RANDOM_GROUPING_STREAM = 7  # a seed-sequence key of its own, apart from training's (seed, stage, epoch)


def fit_groups(model: PerpeftModel, split: Split, num_items: int, config: RunConfig) -> tuple[np.ndarray, torch.Tensor]:
    """Group users on their Global-PEFT vectors: assignment ``[U+1]`` (entry 0 unused) and centroids ``[C, d]``."""
    vectors = user_space_vectors(model, split, num_items, config).float().cpu().numpy()
    if not np.isfinite(vectors).all():
        raise RunError(
            f"--groups {config.groups}: {int((~np.isfinite(vectors).all(axis=1)).sum())} of {len(vectors)} user "
            f"vectors of the Global PEFT snapshot are not finite (the stage diverged): train again with a lower "
            f"learning rate (this run: --lr {config.lr:g})"
        )
    world = current_world()
    shape = (config.groups, vectors.shape[1])
    if world.is_main:
        labels, centroids = cluster_users(vectors, config)
    else:
        labels, centroids = np.zeros(len(vectors), dtype=np.int64), np.zeros(shape, dtype=np.float32)
    if not world.alone:  # clustered once, on rank 0; every rank gets its result
        labels = world.broadcast(torch.as_tensor(labels)).numpy()
        centroids = world.broadcast(torch.as_tensor(centroids)).numpy()
    assignment = np.concatenate([[0], labels]).astype(np.int64)
    return assignment, torch.from_numpy(np.asarray(centroids, dtype=np.float32))


def cluster_users(vectors: np.ndarray, config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``[U]`` (int64) and centroids ``[C, d]`` (float32) of ``vectors`` ``[U, d]`` under the run's
    grouping, seeded by its grouping seed.

    ``kmeans``: scikit-learn K-Means (C clusters, max_iter 100). ``gmm``: a Gaussian mixture (full
    covariances); its centroids are the component means. ``--grouping random``: a balanced random
    assignment; its centroids are the groups' mean vectors. New users always join the nearest centroid
    (K-Means' rule; for a GMM this ignores the covariances).
    """
    if vectors.shape[0] < config.groups:
        raise InputError(f"--groups {config.groups}: only {vectors.shape[0]} users to group")
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
