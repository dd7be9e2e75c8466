"""The registered operators on both paths: schema, fake implementations and autograd registration
(``torch.library.opcheck``), the reference path's written-out gradients against autograd through the
references (the Triton path's are in test_lora.py, test_ia3.py and test_bce.py), and eager calls on the
reference path skipping the operators."""

from collections.abc import Callable

import pytest
import torch

from perpeft.kernels.ops import bce_with_negatives, grouped_ia3, grouped_lora
from perpeft.kernels.reference import bce_with_negatives_reference, grouped_ia3_reference, grouped_lora_reference
from perpeft.kernels.segments import segment_groups

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ops = torch.ops.perpeft
GROUPS = 3
IDS = {"mixed": [2, 0, 2, 1, 0, 2], "shared": [1] * 6}
NEEDS = [(True, True, True), (False, True, True), (True, False, False)]


def _tensors(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(DEVICE) for shape in shapes]


def _ids(batch: str) -> torch.Tensor:
    return torch.tensor(IDS[batch], device=DEVICE)


def assert_same_grads(leaves: list[torch.Tensor], refs: list[torch.Tensor], assert_close: Callable) -> None:
    """Each leaf has a gradient exactly where its reference twin has one, and the same values."""
    for leaf, ref in zip(leaves, refs, strict=True):
        assert (leaf.grad is None) == (ref.grad is None)
        if ref.grad is not None:
            assert_close(leaf.grad, ref.grad, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", backend)
    ids = _ids("mixed")
    segments = segment_groups(ids, GROUPS)
    parts = (segments.order, segments.counts, segments.offsets)
    x, a, b, grad, scales, shrunk = _tensors((6, 16), (GROUPS, 4, 16), (GROUPS, 8, 4), (6, 8), (GROUPS, 16), (6, 4))
    h, pos, neg = _tensors((6, 16), (6, 16), (6, 16), seed=1)
    grads = [t.clone().requires_grad_() for t in (x, a, b, scales)]
    checks = [
        (ops.grouped_lora.default, (*grads[:3], ids, *parts, 0.5)),
        (ops.grouped_lora.default, (*grads[:3], ids, None, None, None, 0.5)),
        (ops.grouped_lora_backward.default, (grad, x, a, b, shrunk, ids, *parts, 0.5, True, False, True)),
        (ops.grouped_ia3.default, (grads[0], grads[3], ids, *parts)),
        (ops.grouped_ia3_backward.default, (x, x, scales, ids, None, None, None, False, True)),
        (ops.bce_with_negatives.default, (h.requires_grad_(), pos, neg.requires_grad_(), ids == 2, True, False, True)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_ops_match_eager(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three ops chained under torch.compile (fullgraph, ``aot_eager``): the same loss and gradients."""
    monkeypatch.setenv("PERPEFT_KERNELS", backend)
    ids = _ids("mixed")
    segments = segment_groups(ids, GROUPS)
    x, a, b, scales, pos, neg = _tensors((6, 16), (GROUPS, 4, 16), (GROUPS, 16, 4), (GROUPS, 16), (6, 16), (6, 16))
    leaves = [t.requires_grad_() for t in (x, a, b, scales)]

    def loss(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        hidden = x + grouped_lora(x, lora_a, lora_b, ids, 0.5, segments=segments)
        return bce_with_negatives(grouped_ia3(hidden, scales, ids, segments=segments), pos, neg, ids != 1)

    expected = loss(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    actual = compiled(*leaves)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(actual, leaves), expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("needs", NEEDS, ids=str)
@pytest.mark.parametrize("batch", IDS)
def test_reference_path_lora_gradients(
    batch: str, needs: tuple[bool, ...], monkeypatch: pytest.MonkeyPatch, assert_close: Callable
) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    tensors = _tensors((6, 16), (GROUPS, 4, 16), (GROUPS, 8, 4))
    grad, ids = torch.randn(6, 8, device=DEVICE), _ids(batch)
    leaves = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]
    out = ops.grouped_lora(*leaves, ids, None, None, None, 0.5)[0]
    out.backward(grad)
    refs = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]
    expected = grouped_lora_reference(*refs, ids, 0.5)
    expected.backward(grad)
    assert_close(out, expected.detach(), torch.float32)
    assert_same_grads(leaves, refs, assert_close)


@pytest.mark.parametrize("needs", NEEDS[:2], ids=str)
@pytest.mark.parametrize("batch", IDS)
def test_reference_path_ia3_gradients(
    batch: str, needs: tuple[bool, ...], monkeypatch: pytest.MonkeyPatch, assert_close: Callable
) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    tensors = _tensors((6, 16), (GROUPS, 16))
    grad, ids = torch.randn(6, 16, device=DEVICE), _ids(batch)
    leaves = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs[1:], strict=True)]
    segments = segment_groups(ids, GROUPS)
    out = ops.grouped_ia3(*leaves, ids, segments.order, segments.counts, segments.offsets)
    out.backward(grad)
    refs = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs[1:], strict=True)]
    expected = grouped_ia3_reference(*refs, ids)
    expected.backward(grad)
    assert_close(out, expected.detach(), torch.float32)
    assert_same_grads(leaves, refs, assert_close)


@pytest.mark.parametrize("needs", NEEDS, ids=str)
def test_reference_path_bce_gradients(
    needs: tuple[bool, ...], monkeypatch: pytest.MonkeyPatch, assert_close: Callable
) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    tensors = _tensors((7, 16), (7, 16), (7, 16))
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool, device=DEVICE)
    leaves = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]
    (ops.bce_with_negatives(*leaves, mask, *needs)[0] * -2.0).backward()
    refs = [t.clone().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]
    (bce_with_negatives_reference(*refs, mask) * -2.0).backward()
    assert_same_grads(leaves, refs, assert_close)


def test_reference_path_runs_outside_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its outputs keep the dtypes the fake implementations declare, as the kernels' do."""
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    x, a, b = (t.to("cpu") for t in _tensors((6, 16), (GROUPS, 4, 16), (GROUPS, 8, 4)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_lora(x, a, b, torch.tensor(IDS["mixed"]), 0.5).dtype == torch.float32


def test_eager_reference_calls_skip_the_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside torch.compile the reference path runs the references directly (the same values); under it, and on
    the Triton path, the operators run."""
    from perpeft.kernels import ops as ops_module

    calls: list[str] = []
    for name in ("_grouped_lora", "_grouped_ia3", "_bce_with_negatives"):
        op = getattr(ops_module, name)
        monkeypatch.setattr(ops_module, name, lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    x, a, b, scales, pos, neg = _tensors((6, 16), (GROUPS, 4, 16), (GROUPS, 16, 4), (GROUPS, 16), (6, 16), (6, 16))
    ids, mask = _ids("mixed"), _ids("mixed") != 1
    lora = grouped_lora(x, a, b, ids, 0.5)
    ia3 = grouped_ia3(x, scales, ids)
    loss = bce_with_negatives(x, pos, neg, mask)
    assert calls == []
    torch.testing.assert_close(lora, ops.grouped_lora(x, a, b, ids, None, None, None, 0.5)[0])
    torch.testing.assert_close(ia3, ops.grouped_ia3(x, scales, ids, None, None, None))
    torch.testing.assert_close(loss, ops.bce_with_negatives(x, pos, neg, mask, False, False, False)[0])
    monkeypatch.setenv("PERPEFT_KERNELS", "triton")
    grouped_ia3(x, scales, ids)
    assert calls == ["_grouped_ia3"]
