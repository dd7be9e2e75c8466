"""FlatAdamW against torch's fused AdamW: the same weights and state to float rounding, its state in torch's form."""

import copy

import pytest
import torch
from torch import nn

from perpeft.engine.train.optimizer import FlatAdamW


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _groups(model: nn.Module) -> list[dict]:
    """Two groups, the second at its own rate (as the engine's ``--id-lr``)."""
    embedding, *rest = model.parameters()
    return [{"params": rest}, {"params": [embedding], "lr": 3e-3}]


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (8,), generator=generator)
    target = torch.randn(8, 3, generator=generator)
    optimizer.zero_grad()
    loss = ((model(ids) - target) ** 2).mean()
    loss.backward()
    optimizer.step()


def _pair() -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, FlatAdamW]:
    reference, flat = _model(0), _model(0)
    expected = torch.optim.AdamW(_groups(reference), lr=1e-2, weight_decay=0.1, fused=True)
    return reference, expected, flat, FlatAdamW(_groups(flat), lr=1e-2, weight_decay=0.1)


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert actual["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(actual["state"][index][key], value, rtol=1e-5, atol=0)


def test_weights_and_state_equal_torch_adamw() -> None:
    reference, expected, flat, optimizer = _pair()
    for seed in range(6):
        _step(reference, expected, seed)
        _step(flat, optimizer, seed)
    for ours, theirs in zip(flat.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    _assert_same_state(optimizer.state_dict(), expected.state_dict())


def test_parameters_and_gradients_are_views_of_the_flat_tensors() -> None:
    _, _, flat, optimizer = _pair()
    _step(flat, optimizer, 0)
    for group, members in zip(optimizer.param_groups, _groups(flat), strict=True):
        (packed,) = group["params"]
        assert sum(p.numel() for p in members["params"]) == packed.numel()
        for parameter in members["params"]:
            assert parameter.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
            assert parameter.grad.untyped_storage().data_ptr() == packed.grad.untyped_storage().data_ptr()
    optimizer.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in flat.parameters())


def test_resumes_from_torch_adamw_state_and_continues_equal() -> None:
    """A checkpoint of torch's AdamW (the engine's format before FlatAdamW) loads and training goes on equal."""
    reference, expected, flat, optimizer = _pair()
    for seed in range(3):
        _step(reference, expected, seed)
    flat.load_state_dict(reference.state_dict())
    optimizer.load_state_dict(copy.deepcopy(expected.state_dict()))  # as read from a file: no shared tensors
    for seed in range(3, 6):
        _step(reference, expected, seed)
        _step(flat, optimizer, seed)
    for ours, theirs in zip(flat.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)


def test_a_replaced_gradient_is_refused() -> None:
    _, _, flat, optimizer = _pair()
    _step(flat, optimizer, 0)
    flat.zero_grad()  # nn.Module's: sets every .grad to None, cutting it from the flat gradient
    ((flat(torch.tensor([1, 2])) ** 2).sum()).backward()
    with pytest.raises(RuntimeError, match="gradient was replaced"):
        optimizer.step()


def test_state_of_other_groups_is_refused() -> None:
    _, expected, _, optimizer = _pair()
    state = expected.state_dict()
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="other parameter groups"):
        optimizer.load_state_dict(state)
