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
    item encoded once (grouping, at E1). `grouping_space_vectors` gives the same vectors for a few histories."""
    model.eval()
    device = model.recommender.item_embeddings.weight.device
    tables = model.item_tables(num_items, config.encode_batch_size)
    windows = torch.from_numpy(last_window(grouping_histories(split)[1:], config.maxlen)).to(device)
    zeros = torch.zeros(windows.shape[0], dtype=torch.long, device=device)
    users = torch.arange(1, windows.shape[0] + 1)
    return model.gathered_user_vectors(windows, zeros, tables, config.eval_batch_size, users)


def grouping_space_vectors(snapshot: PerpeftModel, histories: list[np.ndarray], maxlen: int) -> torch.Tensor:
    """Users' vectors ``[N, d]`` in the grouping space: the Global-PEFT snapshot's SASRec output at the last
    position of each history's last ``maxlen`` items, the only items it encodes."""
    windows = last_window(histories, maxlen)
    items = torch.from_numpy(np.unique(windows[windows != 0]))
    with torch.no_grad():
        vectors = snapshot.item_vectors(items, 0)
    table = vectors.new_zeros(1, snapshot.recommender.item_embeddings.num_embeddings, vectors.shape[-1])
    table[0, items] = vectors
    groups = torch.zeros(len(histories), dtype=torch.long)
    return snapshot.user_vectors(torch.from_numpy(windows), groups, table, len(histories))


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the (Euclidean) nearest centroid of each vector: K-Means' assignment rule."""
    return torch.cdist(vectors, centroids).argmin(dim=1)
