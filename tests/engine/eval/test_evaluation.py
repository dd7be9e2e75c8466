"""Per-epoch evaluation's item-vector diagnostics: the norms of z = 0.5·MLP_g(m) + h's two terms."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from perpeft.engine.eval.evaluation import item_vector_norms


def test_norms_split_each_table_into_its_multimodal_term_and_its_id_embedding() -> None:
    ids = nn.Embedding(4, 2)
    with torch.no_grad():
        ids.weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]))
    model = SimpleNamespace(recommender=SimpleNamespace(item_embeddings=ids))
    multimodal = torch.tensor(
        [[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]]
    )
    tables = multimodal + ids.weight.detach()
    norms = item_vector_norms(model, tables)
    assert norms["id"] == pytest.approx((5 + 1 + 10) / 3)
    assert norms["multimodal"] == pytest.approx((1 + 2 + 0 + 0 + 0 + 5) / 6)  # row 0 (padding) left out
    assert item_vector_norms(model, ids.weight.detach()[None])["multimodal"] == 0.0  # item IDs only
