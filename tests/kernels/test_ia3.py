"""Triton grouped (IA)3 against the PyTorch reference: forward, dx and the per-group scale gradients."""

from collections.abc import Callable

import pytest
import torch

from perpeft.kernels import ia3 as ia3_kernels
from perpeft.kernels.ops import grouped_ia3
from perpeft.kernels.reference import grouped_ia3_reference
from perpeft.kernels.segments import segment_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]

# name: (rows, width, groups, group ids or None for random over all groups)
CASES = {
    "mixed_with_empty_group": (24, 768, 5, [0, 1, 3, 4]),
    "one_group": (8, 512, 1, None),
    "single_row_of_16_groups": (1, 3072, 16, None),
    "skewed_16_groups": (40, 3072, 16, [2, 9, 9, 9]),
}


def _inputs(rows: int, width: int, groups: int, allowed: list[int] | None, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen).to(DEVICE, dtype)
    scales = (1 + 0.5 * torch.randn(groups, width, generator=gen)).to(DEVICE, dtype)
    grad = torch.randn(rows, width, generator=gen).to(DEVICE, dtype)
    pool = torch.tensor(allowed if allowed is not None else list(range(groups)))
    ids = pool[torch.randint(0, len(pool), (rows,), generator=gen)].to(DEVICE)
    return x, scales, grad, ids


def _check(
    x: torch.Tensor,
    scales: torch.Tensor,
    grad: torch.Tensor,
    ids: torch.Tensor,
    assert_close: Callable,
    needs: tuple[bool, bool] = (True, True),
    **kwargs,
) -> None:
    leaves = [t.clone().requires_grad_(n) for t, n in zip((x, scales), needs, strict=True)]
    out = grouped_ia3(*leaves, ids, **kwargs)
    assert out.grad_fn.name() == "GeneratedBackwardFor_perpeft_grouped_ia3_defaultBackward"
    out.backward(grad)
    refs = [t.float().requires_grad_(n) for t, n in zip((x, scales), needs, strict=True)]
    expected = grouped_ia3_reference(*refs, ids)
    expected.backward(grad.float())
    assert_close(out, expected.detach(), x.dtype)
    for leaf, ref in zip(leaves, refs, strict=True):
        if ref.requires_grad:
            assert_close(leaf.grad, ref.grad, x.dtype)
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, dtype: torch.dtype, assert_close: Callable) -> None:
    _check(*_inputs(*CASES[case], dtype), assert_close)


@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["frozen_scales", "frozen_input"])
def test_frozen_inputs_get_no_gradient(needs: tuple[bool, bool], assert_close: Callable) -> None:
    _check(*_inputs(20, 768, 3, None, torch.float32), assert_close, needs=needs)


def test_item_segments_serve_token_rows(assert_close: Callable) -> None:
    items, tokens, groups = 5, 7, 3
    item_ids = torch.tensor([2, 0, 2, 2, 0], device=DEVICE)
    x, scales, grad, _ = _inputs(items * tokens, 512, groups, None, torch.float32)
    token_ids = item_ids.repeat_interleave(tokens)
    _check(x, scales, grad, token_ids, assert_close, segments=segment_groups(item_ids, groups))


def test_split_reduction(monkeypatch: pytest.MonkeyPatch, assert_close: Callable) -> None:
    """A large program target splits each group's rows over several programs."""
    monkeypatch.setattr(ia3_kernels, "target_programs", lambda device: 64)
    _check(*_inputs(150, 512, 2, None, torch.float32), assert_close)


def test_strided_views(strided: Callable, assert_close: Callable) -> None:
    """Non-contiguous x, scales, ids and output gradient, read through their strides."""
    x, scales, grad, ids = _inputs(40, 160, 3, None, torch.float32)
    views = [strided(t) for t in (x, scales)]
    out = grouped_ia3(*views, strided(ids), segments=segment_groups(ids, 3))
    grads = torch.autograd.grad(out, views, strided(grad).detach())
    refs = [t.requires_grad_() for t in (x, scales)]
    expected = grouped_ia3_reference(*refs, ids)
    assert_close(out, expected.detach(), torch.float32)
    for actual, reference in zip(grads, torch.autograd.grad(expected, refs, grad), strict=True):
        assert_close(actual, reference, torch.float32)


def test_rejects_mismatched_shapes() -> None:
    x, scales, _, ids = _inputs(6, 512, 3, None, torch.float32)
    with pytest.raises(ValueError, match="shapes"):
        grouped_ia3(x, scales[:, :256], ids)
    with pytest.raises(ValueError, match="groups"):
        grouped_ia3(x, scales, ids, segments=segment_groups(ids, 4))
