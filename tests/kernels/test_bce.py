"""Fused Triton BCE-with-negatives against the PyTorch reference: loss and the saved gradients."""

from collections.abc import Callable

import pytest
import torch

from perpeft.kernels.ops import bce_with_negatives
from perpeft.kernels.reference import bce_with_negatives_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]

# name: (rows, width, mask pattern)
CASES = {
    "mixed_mask": (37, 64, "random"),
    "single_row": (1, 768, "all"),
    "non_power_of_two_width": (50, 300, "random"),
    "width_over_one_block": (3, 1500, "random"),
    "all_masked_out": (9, 128, "none"),
}


def _inputs(rows: int, width: int, pattern: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, pos, neg = (torch.randn(rows, width, generator=gen) / width**0.25 for _ in range(3))
    mask = {"random": torch.rand(rows, generator=gen) < 0.6, "all": torch.ones(rows, dtype=torch.bool)}.get(
        pattern, torch.zeros(rows, dtype=torch.bool)
    )
    return [t.to(DEVICE, dtype) for t in (h, pos, neg)], mask.to(DEVICE)


def _check(
    tensors: list[torch.Tensor],
    mask: torch.Tensor,
    assert_close: Callable,
    needs: tuple[bool, bool, bool] = (True, True, True),
    grad_scale: float = 1.0,
) -> None:
    dtype = tensors[0].dtype
    leaves = [t.clone().requires_grad_(n) for t, n in zip(tensors, needs, strict=True)]
    loss = bce_with_negatives(*leaves, mask)
    assert loss.grad_fn.name() == "GeneratedBackwardFor_perpeft_bce_with_negatives_defaultBackward"
    (loss * grad_scale).backward()
    refs = [t.float().requires_grad_(n) for t, n in zip(tensors, needs, strict=True)]
    expected = bce_with_negatives_reference(*refs, mask)
    (expected * grad_scale).backward()
    assert_close(loss, expected.detach(), dtype)
    for leaf, ref in zip(leaves, refs, strict=True):
        if ref.requires_grad:
            assert_close(leaf.grad, ref.grad, dtype)
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, dtype: torch.dtype, assert_close: Callable) -> None:
    _check(*_inputs(*CASES[case], dtype), assert_close)


def test_backward_scales_by_grad_output(assert_close: Callable) -> None:
    _check(*_inputs(20, 96, "random", torch.float32), assert_close, grad_scale=-3.0)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True)], ids=["h_only", "items_only"])
def test_frozen_inputs_get_no_gradient(needs: tuple[bool, bool, bool], assert_close: Callable) -> None:
    _check(*_inputs(20, 96, "random", torch.float32), assert_close, needs=needs)


def test_strided_views(strided: Callable, assert_close: Callable) -> None:
    """Non-contiguous h, pos, neg and mask, read through their strides."""
    tensors, mask = _inputs(30, 96, "random", torch.float32)
    views = [strided(t) for t in tensors]
    loss = bce_with_negatives(*views, strided(mask))
    grads = torch.autograd.grad(loss, views)
    refs = [t.requires_grad_() for t in tensors]
    expected = bce_with_negatives_reference(*refs, mask)
    assert_close(loss, expected.detach(), torch.float32)
    for actual, reference in zip(grads, torch.autograd.grad(expected, refs), strict=True):
        assert_close(actual, reference, torch.float32)


def test_no_grad_computes_the_loss_only(assert_close: Callable) -> None:
    tensors, mask = _inputs(20, 96, "random", torch.float32)
    params = [t.requires_grad_() for t in tensors]
    with torch.no_grad():
        loss = bce_with_negatives(*params, mask)
    assert loss.grad_fn is None
    assert_close(loss, bce_with_negatives_reference(*tensors, mask).detach(), torch.float32)


def test_a_second_backward_gives_the_same_gradients() -> None:
    """The backward scales the saved gradients out of place: walking the node again gives them again."""
    tensors, mask = _inputs(8, 64, "random", torch.float32)
    leaves = [t.requires_grad_() for t in tensors]
    loss = bce_with_negatives(*leaves, mask)
    first = torch.autograd.grad(loss * 2.0, leaves, retain_graph=True)
    second = torch.autograd.grad(loss * 2.0, leaves)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
