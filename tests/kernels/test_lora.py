"""Triton grouped LoRA against the PyTorch reference: forward and the three gradients."""

from collections.abc import Callable

import pytest
import torch

from perpeft.kernels import lora as lora_kernels
from perpeft.kernels._triton import recorded_launches
from perpeft.kernels.ops import grouped_lora
from perpeft.kernels.reference import grouped_lora_reference, grouped_lora_shrink
from perpeft.kernels.segments import segment_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
SCALING = 0.5

# name: (rows, in width, out width, rank, groups, group ids or None for random over all groups)
CASES = {
    "mixed_with_empty_group": (24, 512, 768, 4, 5, [0, 1, 3, 4]),
    "one_group": (8, 768, 512, 16, 1, None),
    "single_row_of_16_groups": (1, 3072, 512, 4, 16, None),
    "wide_output": (3, 512, 3072, 16, 2, None),
    "non_power_of_two": (4, 2048, 768, 4, 3, None),
    "skewed_16_groups": (12, 768, 768, 16, 16, [0, 15, 15, 15]),
}


def _inputs(rows: int, width_in: int, width_out: int, rank: int, groups: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width_in, generator=gen)
    lora_a = torch.randn(groups, rank, width_in, generator=gen) / width_in**0.5
    lora_b = torch.randn(groups, width_out, rank, generator=gen) / rank**0.5
    grad = torch.randn(rows, width_out, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, lora_a, lora_b)], grad.to(DEVICE, dtype)


def _ids(rows: int, groups: int, allowed: list[int] | None, seed: int = 0) -> torch.Tensor:
    pool = torch.tensor(allowed if allowed is not None else list(range(groups)))
    pick = torch.randint(0, len(pool), (rows,), generator=torch.Generator().manual_seed(seed + 1))
    return pool[pick].to(DEVICE)


def _check(
    tensors: list[torch.Tensor],
    grad: torch.Tensor,
    ids: torch.Tensor,
    assert_close: Callable,
    needs: tuple[bool, bool, bool] = (True, True, True),
    **kwargs,
) -> None:
    dtype = tensors[0].dtype
    leaves = [t.clone().requires_grad_(n) for t, n in zip(tensors, needs, strict=True)]
    out = grouped_lora(*leaves, ids, SCALING, **kwargs)
    assert out.grad_fn.name() == "GeneratedBackwardFor_perpeft_grouped_lora_defaultBackward"
    out.backward(grad)
    refs = [t.float().requires_grad_(n) for t, n in zip(tensors, needs, strict=True)]
    expected = grouped_lora_reference(*refs, ids, SCALING)
    expected.backward(grad.float())
    assert_close(out, expected.detach(), dtype)
    for leaf, ref in zip(leaves, refs, strict=True):
        if ref.requires_grad:
            assert_close(leaf.grad, ref.grad, dtype)
        else:
            assert leaf.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, dtype: torch.dtype, assert_close: Callable) -> None:
    rows, width_in, width_out, rank, groups, allowed = CASES[case]
    tensors, grad = _inputs(rows, width_in, width_out, rank, groups, dtype)
    _check(tensors, grad, _ids(rows, groups, allowed), assert_close)


@pytest.mark.parametrize("needs", [(False, True, True), (True, False, True), (False, False, True)])
def test_frozen_inputs_get_no_gradient(needs: tuple[bool, bool, bool], assert_close: Callable) -> None:
    tensors, grad = _inputs(10, 512, 768, 4, 3, torch.float32)
    _check(tensors, grad, _ids(10, 3, None), assert_close, needs=needs)


@pytest.mark.parametrize("presorted", [True, False], ids=["sorted", "unsorted"])
def test_item_segments_serve_token_rows(presorted: bool, assert_close: Callable) -> None:
    """Segments of 6 item ids drive 6 x 5 token rows, each item's tokens taking its group."""
    items, tokens, groups = 6, 5, 4
    item_ids = torch.tensor([0, 0, 2, 3, 3, 3] if presorted else [3, 0, 3, 2, 0, 3], device=DEVICE)
    tensors, grad = _inputs(items * tokens, 768, 512, 4, groups, torch.float32)
    token_ids = item_ids.repeat_interleave(tokens)
    _check(tensors, grad, token_ids, assert_close, segments=segment_groups(item_ids, groups))


def test_split_reductions(monkeypatch: pytest.MonkeyPatch, assert_close: Callable) -> None:
    """A large program target splits K in the shrinks and rows in the weight-gradient reductions."""
    monkeypatch.setattr(lora_kernels, "target_programs", lambda device: 64)
    tensors, grad = _inputs(80, 768, 512, 4, 2, torch.float32)
    _check(tensors, grad, _ids(80, 2, None), assert_close)


def test_strided_views_are_read_in_place(strided: Callable, assert_close: Callable) -> None:
    """Non-contiguous x, weights and output gradient reach the kernels as they are (no copy), and give the
    reference's output and gradients."""
    tensors, grad = _inputs(12, 96, 80, 4, 3, torch.float32)
    ids = _ids(12, 3, None)
    views = [strided(t) for t in tensors]
    with recorded_launches(programs=8) as launches:
        grouped_lora(*views, ids, SCALING)
    assert launches[0].args[0].data_ptr() == views[0].data_ptr()
    assert launches[0].args[0].stride() == views[0].stride() == (1, 2 * 12)
    out = grouped_lora(*views, ids, SCALING, segments=segment_groups(ids, 3))
    grads = torch.autograd.grad(out, views, strided(grad).detach())
    refs = [t.requires_grad_() for t in tensors]
    expected = grouped_lora_reference(*refs, ids, SCALING)
    assert_close(out, expected.detach(), torch.float32)
    for actual, reference in zip(grads, torch.autograd.grad(expected, refs, grad), strict=True):
        assert_close(actual, reference, torch.float32)


def test_rejects_mismatched_segments() -> None:
    (x, lora_a, lora_b), _ = _inputs(6, 512, 512, 4, 3, torch.float32)
    ids = torch.zeros(6, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        grouped_lora(x, lora_a, lora_b, ids, SCALING, segments=segment_groups(ids, 4))
    with pytest.raises(ValueError, match="evenly"):
        grouped_lora(x, lora_a, lora_b, ids, SCALING, segments=segment_groups(ids[:4], 3))
    with pytest.raises(ValueError, match="shapes"):
        grouped_lora(x, lora_a, lora_b[:, :, :2], ids, SCALING)


@pytest.mark.parametrize("case", CASES)
def test_shrink_is_each_rows_own_rank_space_row(case: str) -> None:
    """`grouped_lora_shrink` (the rank-space rows a caller mixes before expanding, LoRA's `down`) is row n's
    ``x[n] @ A[g].T``, and expanding it row by row gives the reference's output."""
    rows, width_in, width_out, rank, groups, allowed = CASES[case]
    x, lora_a, lora_b = (t.cpu() for t in _inputs(rows, width_in, width_out, rank, groups, torch.float32)[0])
    ids = _ids(rows, groups, allowed).cpu()
    shrunk = grouped_lora_shrink(x, lora_a, ids)
    expected = torch.stack([x[n] @ lora_a[ids[n]].T for n in range(rows)])
    torch.testing.assert_close(shrunk, expected)
    expanded = torch.stack([SCALING * shrunk[n] @ lora_b[ids[n]].T for n in range(rows)])
    torch.testing.assert_close(expanded, grouped_lora_reference(x, lora_a, lora_b, ids, SCALING))
