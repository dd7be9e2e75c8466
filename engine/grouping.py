"""User grouping (paper §3.2.2): Global-PEFT user vectors, K-Means, centroids, nearest-centroid assignment."""

from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.cluster import KMeans

from .config import RunConfig
from .data.split import Split, last_window
from .errors import InputError

if TYPE_CHECKING:
    from .train import PerpeftModel

KMEANS_MAX_ITER = 100


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
    return model.user_vectors(windows, zeros, tables, config.eval_batch_size)


def fit_groups(
    model: "PerpeftModel", split: Split, num_items: int, config: RunConfig
) -> tuple[np.ndarray, torch.Tensor]:
    """K-Means (C clusters, max_iter 100, seeded) on the user vectors: assignment ``[U+1]`` and centroids ``[C, d]``."""
    vectors = user_space_vectors(model, split, num_items, config).float().cpu().numpy()
    if vectors.shape[0] < config.groups:
        raise InputError(f"--groups {config.groups}: only {vectors.shape[0]} users to group")
    kmeans = KMeans(n_clusters=config.groups, max_iter=KMEANS_MAX_ITER, random_state=config.seed, n_init="auto")
    labels = kmeans.fit_predict(vectors)
    assignment = np.concatenate([[0], labels]).astype(np.int64)
    return assignment, torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the (Euclidean) nearest centroid of each vector: K-Means' assignment rule."""
    return torch.cdist(vectors, centroids).argmin(dim=1)
