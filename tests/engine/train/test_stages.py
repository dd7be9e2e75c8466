"""The stage runner's optimiser: one learning rate, or the ID embeddings at their own (``--id-lr``)."""

import torch

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.train.stages import parameter_groups


def id_model() -> PerpeftModel:
    return PerpeftModel(RunConfig(method="wo-mm"), None, None, num_items=12, groups=1)


def test_one_group_at_lr_unless_the_ids_have_their_own_rate() -> None:
    model = id_model()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    (group,) = parameter_groups(model, RunConfig(method="wo-mm", lr=1e-3))
    assert group["params"] == trainable and "lr" not in group

    rest, ids = parameter_groups(model, RunConfig(method="wo-mm", lr=1e-3, id_lr=1e-2))
    assert ids == {"params": [model.recommender.item_embeddings.weight], "lr": 1e-2}
    assert len(rest["params"]) == len(trainable) - 1 and "lr" not in rest


def test_the_id_rate_moves_only_the_id_embeddings_faster() -> None:
    torch.manual_seed(0)
    model = id_model()
    groups = parameter_groups(model, RunConfig(method="wo-mm", lr=1e-3, id_lr=1e-1))
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    ids = "recommender.item_embeddings.weight"
    # Adam's first step moves every entry by its learning rate (the gradient's sign).
    assert torch.allclose((before[ids] - model.recommender.item_embeddings.weight).abs(), torch.tensor(1e-1))
    other = "recommender.position_embeddings.weight"
    moved = (before[other] - dict(model.named_parameters())[other]).abs()
    assert torch.allclose(moved, torch.tensor(1e-3))
