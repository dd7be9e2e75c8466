"""Fused ops against the PyTorch they replace, forward + backward. Run: ``pytest benchmarks --benchmark-enable``.

Peak memory goes to each benchmark's ``extra_info["peak_bytes"]`` (new allocations above the level at
the start of one step). On CPU the ops take the PyTorch reference path (the Triton kernels need CUDA),
so the CPU figures compare the reference with the unfused expression; the CUDA cases, skipped without a
GPU, time the Triton kernels in bf16.
"""

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from perpeft.kernels.ops import bce_with_negatives, grouped_lora
from perpeft.kernels.segments import segment_groups

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def unfused_bce(h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss as a sequential recommender usually writes it: dot products, masked select, two BCEs."""
    pos_logits = (h * pos).sum(-1)[mask]
    neg_logits = (h * neg).sum(-1)[mask]
    return F.binary_cross_entropy_with_logits(
        pos_logits, torch.ones_like(pos_logits)
    ) + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))


def looped_lora(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rows: list[torch.Tensor], scaling: float
) -> torch.Tensor:
    """One pair of plain matmuls per group over that group's rows (row indices precomputed, untimed)."""
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    for group, index in enumerate(rows):
        part = (x.index_select(0, index) @ lora_a[group].T) @ lora_b[group].T
        out = out.index_copy(0, index, part * scaling)
    return out


def _step(loss: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        loss().backward()
        if leaves[0].is_cuda:
            torch.cuda.synchronize()

    return run


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak of the bytes ``step`` allocates beyond what was live when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _bce_inputs(rows: int, width: int, dtype: torch.dtype, device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    leaves = [(torch.randn(rows, width, generator=gen) / width**0.25).to(device, dtype) for _ in range(3)]
    mask = (torch.rand(rows, generator=gen) < 0.8).to(device)
    return [t.requires_grad_() for t in leaves], mask


def _bench_bce(benchmark, fused: bool, rows: int, width: int, dtype: torch.dtype, device: str) -> None:
    leaves, mask = _bce_inputs(rows, width, dtype, device)
    loss_fn = bce_with_negatives if fused else unfused_bce
    step = _step(lambda: loss_fn(*leaves, mask), leaves)
    step()
    benchmark.extra_info["peak_bytes"] = _peak_bytes(step, leaves[0].device)
    benchmark(step)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run CPU benchmarks single-threaded: intra-op threads on a shared, loaded box time mostly their spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_bce_cpu(benchmark, fused: bool, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "auto")
    _bench_bce(benchmark, fused, rows=64 * 50, width=64, dtype=torch.float32, device="cpu")


@needs_cuda
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_bce_cuda(benchmark, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERPEFT_KERNELS", "auto")
    _bench_bce(benchmark, fused, rows=128 * 200, width=512, dtype=torch.bfloat16, device="cuda")


@needs_cuda
@pytest.mark.parametrize("rank", [4, 16])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_op", "looped_matmuls"])
def test_grouped_lora_cuda(benchmark, grouped: bool, rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """ViT-B/16 shapes: 64 images x 197 tokens through a 768 -> 3072 layer, 8 groups, bf16.

    Both sides get their per-batch grouping precomputed and untimed: segments for the op, row indices
    for the loop.
    """
    monkeypatch.setenv("PERPEFT_KERNELS", "auto")
    rows, width_in, width_out, groups, scaling = 64 * 197, 768, 3072, 8, 2.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width_in, generator=gen)
    lora_a = torch.randn(groups, rank, width_in, generator=gen) / width_in**0.5
    lora_b = torch.randn(groups, width_out, rank, generator=gen) / rank**0.5
    leaves = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (x, lora_a, lora_b)]
    item_ids = torch.randint(0, groups, (rows // 197,), generator=gen).cuda()
    ids = item_ids.repeat_interleave(197)
    if grouped:
        segments = segment_groups(item_ids, groups)
        step = _step(lambda: grouped_lora(*leaves, ids, scaling, segments=segments).sum(), leaves)
    else:
        rows_of = [torch.nonzero(ids == g).squeeze(1) for g in range(groups)]
        step = _step(lambda: looped_lora(*leaves, rows_of, scaling).sum(), leaves)
    step()
    benchmark.extra_info["peak_bytes"] = _peak_bytes(step, leaves[0].device)
    benchmark(step)
