"""Frozen linear layers through oneDNN equal their references forward and in the input's gradient, and take
oneDNN exactly where `frozen_backend` says."""

import pytest
import torch
import torch.nn.functional as F

from perpeft.kernels import frozen
from perpeft.kernels.frozen import ROW_BUCKET, frozen_backend, frozen_linear, frozen_silu_mlp
from perpeft.kernels.reference import silu_mlp_reference

needs_onednn = pytest.mark.skipif(not frozen._onednn_available(), reason="torch has no oneDNN matmul on this machine")


KERNELS: set[tuple[object, ...]] = set()


@pytest.fixture
def gemms(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the padded inputs oneDNN multiplied, recorded; ``KERNELS`` collects what picks oneDNN's
    kernel for each (the shapes and strides of input and weight, and whether a bias is added)."""
    calls: list[tuple[int, ...]] = []
    KERNELS.clear()
    gemm = frozen._gemm

    def recorded(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(tuple(padded.shape))
        KERNELS.add((padded.shape, padded.stride(), weight.shape, weight.stride(), bias is None))
        return gemm(padded, weight, bias)

    monkeypatch.setattr(frozen, "_gemm", recorded)
    monkeypatch.delenv("PERPEFT_KERNELS", raising=False)
    return calls


def _parameters(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 0.2 for shape in shapes]


def _input(shape: tuple[int, ...], layout: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    if layout == "contiguous":
        return torch.randn(shape, generator=generator).requires_grad_(True)
    # Every dimension reversed in memory: the features, which the GEMM reads along, are the outermost.
    x = torch.randn(shape[::-1], generator=generator).permute(*reversed(range(len(shape))))
    assert x.shape == shape and x.stride()[-1] != 1
    return x.requires_grad_(True)


def _padded_rows(rows: int) -> int:
    return frozen._padded(torch.zeros(rows, 1)).shape[0]


def test_rows_are_padded_to_few_row_counts() -> None:
    """Multiples of 128 rows up to 2,047, then an eighth of the power of two below: never more than 12.5% of
    the rows added, and a few dozen row counts from 256 to 16k rows for oneDNN to build kernels for."""
    counts = {_padded_rows(rows) for rows in range(frozen.ONEDNN_ROWS_AT_LEAST, 16_385)}
    assert len(counts) <= 60
    for rows in [256, 300, 1000, 1025, 2047, 2049, 3400, 4100, 9000, 16_384]:
        padded = _padded_rows(rows)
        assert padded % ROW_BUCKET == 0 and rows <= padded <= rows * 1.125 + ROW_BUCKET, rows
    assert [_padded_rows(rows) for rows in (300, 2049, 4100)] == [384, 2304, 4608]


def _value_and_input_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "transposed view"])
@pytest.mark.parametrize("shape", [(300, 48), (3 * ROW_BUCKET, 48), (4, 97, 48), (2049, 48)])
def test_frozen_linear_equals_f_linear(gemms, shape: tuple[int, ...], layout: str, bias: bool) -> None:
    weight, bias_tensor = _parameters(1, [(80, 48), (80,)])
    b = bias_tensor if bias else None
    x = _input(shape, layout)
    assert frozen_backend(x, weight, b) == "onednn"
    out, grad = _value_and_input_grad(lambda rows: frozen_linear(rows, weight, b), x)
    expected, expected_grad = _value_and_input_grad(lambda rows: F.linear(rows, weight, b), x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    padded = _padded_rows(x.numel() // 48)
    assert gemms == [(padded, 48), (padded, 80)]  # forward, then the input's gradient


@needs_onednn
@pytest.mark.parametrize("layout", ["contiguous", "transposed view"])
@pytest.mark.parametrize("shape", [(300, 32), (2, 200, 32)])
def test_frozen_silu_mlp_equals_its_reference(gemms, shape: tuple[int, ...], layout: str) -> None:
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = _parameters(2, [(96, 32), (96,), (32, 96), (32,)])
    x = _input(shape, layout)
    parameters = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    out, grad = _value_and_input_grad(lambda rows: frozen_silu_mlp(rows, *parameters), x)
    expected, expected_grad = _value_and_input_grad(lambda rows: silu_mlp_reference(rows, *parameters), x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
    padded = _padded_rows(x.numel() // 32)
    # fc1 and fc2 forward, then fc2's and fc1's input gradients: padded once each way
    assert gemms == [(padded, 32), (padded, 96), (padded, 32), (padded, 96)]
    assert len(KERNELS) == 2  # each input gradient runs as the other layer's forward: one kernel each


@needs_onednn
def test_a_linear_layers_input_gradient_shares_its_kernel(gemms) -> None:
    weight, bias = _parameters(4, [(64, 64), (64,)])
    x = torch.randn(600, 64, requires_grad=True)
    frozen_linear(x, weight, bias).sum().backward()
    assert len(gemms) == 2 and len(KERNELS) == 1


def test_silu_mlp_reference_is_clips_folded_mlp() -> None:
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = _parameters(3, [(96, 32), (96,), (32, 96), (32,)])
    x = torch.randn(5, 32)
    expected = F.linear(F.silu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    assert torch.equal(silu_mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias), expected)


@needs_onednn
def test_oneDNN_only_for_frozen_fp32_cpu_rows_enough(gemms, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(16, 8)
    rows = torch.randn(frozen.ONEDNN_ROWS_AT_LEAST, 8)
    assert frozen_backend(rows, weight, None) == "onednn"
    assert frozen_backend(rows[:-1], weight, None) == "torch"  # too few rows to gain
    assert frozen_backend(rows, weight.requires_grad_(True), None) == "torch"  # its gradient is not written
    assert frozen_backend(rows, weight.detach(), torch.zeros(16, requires_grad=True)) == "torch"
    assert frozen_backend(rows.double(), weight.double(), None) == "torch"
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    assert frozen_backend(rows, weight.detach(), None) == "torch"
    monkeypatch.setenv("PERPEFT_KERNELS", "bogus")
    with pytest.raises(ValueError, match="PERPEFT_KERNELS"):
        frozen_backend(rows, weight.detach(), None)


def test_trainable_weights_take_the_reference_and_get_their_gradients(gemms) -> None:
    weight = torch.randn(16, 8, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    x = torch.randn(512, 8)
    frozen_linear(x, weight, bias).square().sum().backward()
    expected_weight, expected_bias = torch.autograd.grad(F.linear(x, weight, bias).square().sum(), [weight, bias])
    assert weight.grad is not None and bias.grad is not None
    torch.testing.assert_close(weight.grad, expected_weight)
    torch.testing.assert_close(bias.grad, expected_bias)
    assert gemms == []


@needs_onednn
def test_padding_rows_never_reach_the_output(gemms) -> None:
    """The rows oneDNN multiplies past the input's are zeros and are cut off: each row's output is the one
    it has alone in a bucket of its own."""
    weight = torch.randn(24, 8)
    x = torch.randn(ROW_BUCKET + 1 + frozen.ONEDNN_ROWS_AT_LEAST, 8)
    out = frozen_linear(x, weight)
    assert out.shape == (x.shape[0], 24)
    alone = torch.cat([frozen_linear(x[i : i + frozen.ONEDNN_ROWS_AT_LEAST], weight)[:1] for i in (0, 5, 130)])
    torch.testing.assert_close(out[[0, 5, 130]], alone, rtol=1e-6, atol=1e-6)
