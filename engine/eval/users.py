"""Users in the grouping space (paper §3.2.2): Global-PEFT user vectors and the nearest-centroid rule that
assigns a user, seen or new, to a group."""

import numpy as np
import torch

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.split import Split, last_window
from perpeft.engine.model.perpeft import PerpeftModel


def grouping_histories(split: Split) -> list[np.ndarray]:
    """Each user's history for grouping: train + validation item (the authors feed train+valid)."""
    return split.history("test")


def user_space_vectors(model: PerpeftModel, split: Split, num_items: int, config: RunConfig) -> torch.Tensor:
    """SASRec's last-position output of a single-group (Global PEFT) model for users 1..U: ``[U, d]``, every
    item encoded once (grouping, at E1); serving places new users through the same table (`embed` caches it)."""
    model.eval()
    device = model.recommender.item_embeddings.weight.device
    tables = model.item_tables(num_items, config.encode_batch_size)
    windows = torch.from_numpy(last_window(grouping_histories(split)[1:], config.maxlen)).to(device)
    zeros = torch.zeros(windows.shape[0], dtype=torch.long, device=device)
    users = torch.arange(1, windows.shape[0] + 1)
    return model.gathered_user_vectors(windows, zeros, tables, config.eval_batch_size, users)


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the (Euclidean) nearest centroid of each vector: K-Means' assignment rule."""
    return torch.cdist(vectors, centroids).argmin(dim=1)
