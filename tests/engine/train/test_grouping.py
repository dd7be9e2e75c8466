"""Grouping as a pure function of user vectors: K-Means, GMM and random groupings, each seeded."""

import numpy as np
import pytest
import torch

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.errors import InputError
from perpeft.engine.eval.users import nearest_centroid
from perpeft.engine.train.grouping import cluster_users


def tight_and_wide_clusters() -> tuple[np.ndarray, np.ndarray]:
    """A tight cluster beside a wide one: K-Means' boundary sits halfway between the centres and gives the
    tight group many of the wide one's users; a full-covariance GMM places it by the spreads."""
    rng = np.random.default_rng(0)
    tight = rng.normal(0, 0.4, size=(300, 2))
    wide = rng.normal(0, 3.0, size=(300, 2)) + np.array([3.5, 0.0])
    return np.vstack([tight, wide]).astype(np.float32), np.repeat([0, 1], 300)


def agreement(labels: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy under the better of the two label matchings."""
    return max(float((labels == truth).mean()), float((labels != truth).mean()))


def test_gmm_follows_the_covariances_and_kmeans_does_not() -> None:
    vectors, truth = tight_and_wide_clusters()
    kmeans, _ = cluster_users(vectors, RunConfig(groups=2))
    gmm, means = cluster_users(vectors, RunConfig(groups=2, clustering="gmm"))
    assert agreement(gmm, truth) > 0.95
    assert agreement(kmeans, truth) < 0.85
    assert means.shape == (2, 2) and means.dtype == np.float32


def test_kmeans_recovers_separated_groups_and_nearest_centroid_agrees() -> None:
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    vectors = np.concatenate([centre + rng.normal(0, 0.5, size=(50, 2)) for centre in centres]).astype(np.float32)
    labels, centroids = cluster_users(vectors, RunConfig(groups=3))
    assert sorted(np.bincount(labels).tolist()) == [50, 50, 50]
    assigned = nearest_centroid(torch.from_numpy(vectors), torch.from_numpy(centroids)).numpy()
    np.testing.assert_array_equal(assigned, labels)


def test_random_grouping_is_balanced_seeded_and_not_the_clustering() -> None:
    vectors = np.random.default_rng(2).normal(size=(101, 4)).astype(np.float32)
    first, centroids = cluster_users(vectors, RunConfig(groups=4, grouping="random", seed=3))
    again, _ = cluster_users(vectors, RunConfig(groups=4, grouping="random", seed=3))
    other, _ = cluster_users(vectors, RunConfig(groups=4, grouping="random", seed=4))
    sizes = np.bincount(first, minlength=4)
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_allclose(centroids[0], vectors[first == 0].mean(axis=0), rtol=1e-6)


def test_clustering_follows_the_grouping_seed() -> None:
    vectors = np.random.default_rng(5).normal(size=(60, 3)).astype(np.float32)
    reseeded, _ = cluster_users(vectors, RunConfig(groups=3, grouping="random", seed=9, global_seed=1))
    original, _ = cluster_users(vectors, RunConfig(groups=3, grouping="random", seed=1))
    np.testing.assert_array_equal(reseeded, original)


def test_fewer_users_than_groups_is_refused() -> None:
    with pytest.raises(InputError, match="--groups 8: only 5 users"):
        cluster_users(np.zeros((5, 2), dtype=np.float32), RunConfig(groups=8))
