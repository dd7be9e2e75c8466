"""Frozen linear layers on the CPU through oneDNN: CLIP's frozen projections and MLPs, forward and input gradient.

On x86 CPUs torch runs fp32 GEMMs through MKL, which on AMD processors takes its AVX2 kernels where the
processor has AVX-512; oneDNN's matmul (``mkldnn::_linear_pointwise``, the op torch.compile's CPU fusions
call) takes the processor's widest kernels: 2.1× MKL on the ``[rows, 64]·[64, 256]`` GEMMs of the benchmark
CLIP on an AVX-512 AMD EPYC, forward and input gradient alike (``benchmarks/RESULTS.md``). oneDNN builds a
primitive per shape (~0.8 ms and ~0.7 MiB kept there), so the rows are padded with zeros to one of a few
dozen row counts (`_padded`): batches of any item count reuse their primitives.

`frozen_linear` is ``F.linear``; `frozen_silu_mlp` is ``fc2(SiLU(fc1(x)))`` (`reference.silu_mlp_reference`),
padded once for both GEMMs and the activation between them. Both give the input's gradient, never the
weights': the oneDNN path is taken only for weights and biases that need no gradient, in fp32, on the CPU,
for at least ``ONEDNN_ROWS_AT_LEAST`` rows, outside torch.compile (whose graphs take the reference and fuse
what they like), and not under ``PERPEFT_KERNELS=torch``. Everywhere else they are the reference.
"""

import functools
import platform

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .ops import kernels_mode

__all__ = ["frozen_backend", "frozen_linear", "frozen_silu_mlp"]

ROW_BUCKET = 128
# Below this, oneDNN's GEMM is no faster than MKL's and the padding is a larger share of the rows.
ONEDNN_ROWS_AT_LEAST = 256


@functools.cache
def _onednn_available() -> bool:
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def frozen_backend(x: Tensor, *parameters: Tensor | None) -> str:
    """``"onednn"`` or ``"torch"``: the path `frozen_linear` and `frozen_silu_mlp` take for input ``x`` and
    their weights and biases ``parameters``."""
    frozen = all(p is None or (not p.requires_grad and p.dtype == torch.float32) for p in parameters)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    use = (
        frozen
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and rows >= ONEDNN_ROWS_AT_LEAST
        and not torch.compiler.is_compiling()
        and kernels_mode() != "torch"
        and _onednn_available()
    )
    return "onednn" if use else "torch"


def _padded(rows: Tensor) -> Tensor:
    """``[M, K]`` rows, contiguous, with zero rows appended up to the next row count oneDNN is given: a
    multiple of ``ROW_BUCKET``, and of an eighth of the power of two below ``M`` where that is larger (at most
    12.5% of the rows added; a few dozen row counts from 256 to 16k)."""
    bucket = max(ROW_BUCKET, (1 << (rows.shape[0].bit_length() - 1)) // 8)
    missing = -rows.shape[0] % bucket
    return F.pad(rows, (0, 0, 0, missing)) if missing else rows.contiguous()


def _gemm(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``rows @ weight.T + bias`` by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def _input_grad(grad: Tensor, weight: Tensor, zero_bias: bool) -> Tensor:
    """``grad @ weight`` for padded rows ``grad``, run as a linear layer of weight ``weight.T`` (contiguous) and,
    with ``zero_bias``, a bias of zeros: so shaped it shares oneDNN's kernel for each row count with a forward
    layer (fc2's input gradient with fc1, fc1's with fc2, another layer's with itself) instead of building
    one of its own."""
    transposed = weight.t().contiguous()
    return _gemm(grad, transposed, transposed.new_zeros(transposed.shape[0]) if zero_bias else None)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return _gemm(_padded(rows), weight, bias)[: rows.shape[0]]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return _input_grad(_padded(grad), weight, ctx.has_bias)[: grad.shape[0]], None, None


class _FrozenSiluMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, rows: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None
    ) -> Tensor:
        hidden = _gemm(_padded(rows), fc1_weight, fc1_bias)
        ctx.save_for_backward(hidden, fc1_weight, fc2_weight)
        ctx.has_biases = fc1_bias is not None, fc2_bias is not None
        return _gemm(F.silu(hidden), fc2_weight, fc2_bias)[: rows.shape[0]]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        hidden, fc1_weight, fc2_weight = ctx.saved_tensors
        fc1_has_bias, fc2_has_bias = ctx.has_biases
        # fc2's input gradient is shaped like fc1's forward, fc1's like fc2's.
        grad_hidden = torch.ops.aten.silu_backward(_input_grad(_padded(grad), fc2_weight, fc1_has_bias), hidden)
        return _input_grad(grad_hidden, fc1_weight, fc2_has_bias)[: grad.shape[0]], None, None, None, None


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; by oneDNN where `frozen_backend` says so (then no weight gradient)."""
    if frozen_backend(x, weight, bias) == "torch":
        return F.linear(x, weight, bias)
    out = _FrozenLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def frozen_silu_mlp(
    x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None
) -> Tensor:
    """``fc2(SiLU(fc1(x)))`` (`reference.silu_mlp_reference`); by oneDNN where `frozen_backend` says so."""
    if frozen_backend(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) == "torch":
        return reference.silu_mlp_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    out = _FrozenSiluMLP.apply(x.reshape(-1, x.shape[-1]), fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return out.view(*x.shape[:-1], fc2_weight.shape[0])
