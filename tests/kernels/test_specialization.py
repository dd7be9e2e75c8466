"""No kernel compiles another binary when only the batch changes (issue 24, "Recompiles mid-run").

Titles are trimmed to each batch's longest, so the text tower's tokens per item ``T`` (and its rows
``N = B * T``) move from batch to batch. Every launch the ops issue for one layer, forward and backward,
is recorded at several batch sizes ``B`` and title widths ``T`` (``N`` and ``T`` equal to 1, divisible by
16 or neither) and bound by Triton's own binder, as ``JITFunction.run`` binds it for a CUDA target: the
specialisation (argument types, integers equal to 1 or divisible by 16, pointer alignment, constexpr
values) and the options, i.e. the key of Triton's kernel cache. Each layer must bind to one key per
launch at every batch. Nothing runs and no GPU is needed: launches are bound for sm_90 as
:mod:`perpeft.kernels.resources` binds them to compile its table.
"""

import contextlib
import functools
import importlib
import itertools
from collections.abc import Callable

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import jit as triton_jit
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

from perpeft.kernels import resources
from perpeft.kernels._triton import KernelLaunch, _interpreter_mode, recorded_launches, triton
from perpeft.kernels.ops import bce_with_negatives, grouped_ia3, grouped_lora
from perpeft.kernels.segments import segment_groups

ITEMS = (1, 7, 64)
TOKENS = (1, 5, 16, 17, 33, 77)
BATCHES = list(itertools.product(ITEMS, TOKENS))
PROGRAMS = resources.TARGETS["sm_90"].programs
DTYPES = [torch.float32, torch.bfloat16]
GROUPS = (1, 16)
_BACKEND = make_backend(GPUTarget("cuda", 90, 32))

# Triton's binder imports Gluon on first use, and Gluon's import wraps triton.language's helpers, which
# this package re-imported as interpreted ones without CUDA: Gluon accepts them only in interpreter mode.
with _interpreter_mode(), contextlib.suppress(ModuleNotFoundError):
    importlib.import_module("triton.experimental.gluon")


def _jit_function(kernel: object) -> JITFunction:
    """The kernel as Triton compiles it: itself when compiled, rebuilt with its jit options when interpreted."""
    if isinstance(kernel, JITFunction):
        return kernel
    options = getattr(kernel, "kwargs", None)
    if not isinstance(kernel, InterpretedFunction) or not isinstance(options, dict):
        raise TypeError(f"Triton {triton.__version__}: cannot read the jit options of {kernel!r}")
    return JITFunction(kernel.fn, **options)


@functools.cache
def _binder(kernel: object) -> tuple[JITFunction, Callable]:
    function = _jit_function(kernel)
    return function, create_function_from_signature(function.signature, function.params, _BACKEND)


def _key(launch: KernelLaunch) -> tuple[str, str, tuple[str, ...]]:
    """Kernel name, Triton's cache key, and the key's parts by parameter for a failure message."""
    function, binder = _binder(launch.kernel)
    _, specialization, options = binder(*launch.args, **launch.options)
    if hasattr(triton_jit, "compute_cache_key"):
        key = triton_jit.compute_cache_key({}, specialization, options)
    else:  # what compute_cache_key keys on (Triton 3.9); none of these kernels takes a jit function argument
        key = str(specialization) + str(options)
    parts = tuple(f"{p.name}={s}" for p, s in zip(function.params, specialization, strict=True))
    return function.fn.__name__, key, (*parts, f"options={options}")


def _keys(op: Callable[[int, int], torch.Tensor], items: int, tokens: int) -> list[tuple[str, str, tuple[str, ...]]]:
    with recorded_launches(PROGRAMS) as launches:
        out = op(items, tokens)
        if out.requires_grad:
            out.backward(torch.empty_like(out))
    return [_key(launch) for launch in launches]


def _assert_one_key_per_launch(op: Callable[[int, int], torch.Tensor]) -> None:
    """``op(B, T)`` binds each of its launches alike at every batch of ``BATCHES``."""
    first = _keys(op, *BATCHES[0])
    assert first
    for items, tokens in BATCHES[1:]:
        keys = _keys(op, items, tokens)
        assert [name for name, _, _ in keys] == [name for name, _, _ in first]
        for (name, key, parts), (_, first_key, first_parts) in zip(keys, first, strict=True):
            if key != first_key:
                changed = [(a, b) for a, b in zip(parts, first_parts, strict=True) if a != b]
                pytest.fail(
                    f"{name} needs another binary at B={items}, T={tokens} than at B, T = {BATCHES[0]}: "
                    + ", ".join(f"{a} (was {b.split('=', 1)[1]})" for a, b in changed)
                )


def _item_groups(items: int, groups: int) -> torch.Tensor:
    return torch.arange(items) % groups


def _lora(
    width_in: int, width_out: int, rank: int, groups: int, dtype: torch.dtype, grad_x: bool
) -> Callable[[int, int], torch.Tensor]:
    a = torch.empty(groups, rank, width_in, dtype=dtype, requires_grad=True)
    b = torch.empty(groups, width_out, rank, dtype=dtype, requires_grad=True)

    def op(items: int, tokens: int) -> torch.Tensor:
        ids = _item_groups(items, groups)
        x = torch.empty(items * tokens, width_in, dtype=dtype, requires_grad=grad_x)
        segments = segment_groups(ids, groups)
        return grouped_lora(x, a, b, ids.repeat_interleave(tokens), 2.0, segments=segments)

    return op


@pytest.mark.parametrize("grad_x", [True, False], ids=["dx", "frozen_x"])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("width_in", "width_out", "rank"), [(512, 512, 4), (768, 3072, 16)])
def test_lora_binaries_ignore_the_batch(
    width_in: int, width_out: int, rank: int, dtype: torch.dtype, groups: int, grad_x: bool
) -> None:
    _assert_one_key_per_launch(_lora(width_in, width_out, rank, groups, dtype, grad_x))


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)], ids=["both", "scales", "dx"])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [512, 3072])
def test_ia3_binaries_ignore_the_batch(width: int, dtype: torch.dtype, groups: int, needs: tuple[bool, bool]) -> None:
    scales = torch.empty(groups, width, dtype=dtype, requires_grad=needs[1])

    def op(items: int, tokens: int) -> torch.Tensor:
        ids = _item_groups(items, groups)
        x = torch.empty(items * tokens, width, dtype=dtype, requires_grad=needs[0])
        return grouped_ia3(x, scales, ids.repeat_interleave(tokens), segments=segment_groups(ids, groups))

    _assert_one_key_per_launch(op)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [32, 64, 512])
def test_bce_binaries_ignore_the_batch(width: int, dtype: torch.dtype, grad: bool) -> None:
    def op(users: int, positions: int) -> torch.Tensor:
        rows = users * positions
        h, pos, neg = (torch.empty(rows, width, dtype=dtype, requires_grad=grad) for _ in range(3))
        return bce_with_negatives(h, pos, neg, torch.ones(rows, dtype=torch.bool))

    _assert_one_key_per_launch(op)


def test_keys_tell_layers_apart() -> None:
    """The key is not blind: another dtype, rank or group count binds LoRA's launches to other binaries."""
    layers = [(torch.float32, 4, 8), (torch.bfloat16, 4, 8), (torch.float32, 32, 8), (torch.float32, 4, 32)]
    keys = {tuple(key for _, key, _ in _keys(_lora(512, 512, r, c, dtype, True), 7, 17)) for dtype, r, c in layers}
    assert len(keys) == len(layers)
