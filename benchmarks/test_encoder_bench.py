"""Whole ViT-B/32 CLIP with grouped adapters, against the frozen CLIP and against one global adapter.

A batch of 64 items (20 text tokens, 224x224 images, random weights and inputs) spread over 8 groups in
mixed order. Every ratio is *paired*: the baseline is timed right before each round of the subject
(pedantic's ``setup``), so both sides of a round see the same load on a shared box. The benchmark's
own stats are the subject's; ``extra_info`` records, in wall time (and process CPU time on CPU), both
sides' min/median seconds, the ratio of the mins and the median of the per-round ratios, plus the goal.
CPU cases run the engine's PyTorch path on 2 threads; CUDA cases (skipped without a GPU) run the Triton path under bf16 autocast, plus the per-group
item-embedding pass at Arts scale (18,884 items x 8 groups).

Run: ``pytest benchmarks/test_encoder_bench.py --benchmark-enable`` (several minutes on 2 CPU cores);
``PERPEFT_BENCH_THREADS=1`` for single-threaded CPU cases.
"""

import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from perpeft.engine.clip.loading import ClipBundle, architecture_config
from perpeft.engine.clip.model import ClipModel
from perpeft.engine.clip.preprocess import normalize_pixels
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD
from perpeft.engine.model.encoders import GroupedClipEncoder
from perpeft.engine.model.groups import RowGroups

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ITEMS, GROUPS, TEXT_TOKENS = 64, 8, 20
# Intra-op threads for the CPU cases: 2 (the goal's setting) unless PERPEFT_BENCH_THREADS says otherwise.
CPU_THREADS = int(os.environ.get("PERPEFT_BENCH_THREADS", "2"))
# Whole-model CPU passes take seconds each (tens for forward+backward): few rounds, no warm-up rounds.
CPU_ROUNDS = 3
CUDA_ROUNDS, CUDA_WARMUP = 20, 3
ARTS_ITEMS, ENCODE_CHUNK = 18_884, 1024

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, RowGroups]


@pytest.fixture(scope="module")
def vit_b_32() -> ClipBundle:
    """Random-weight ViT-B/32 CLIP; the benchmarks feed token ids directly, so no tokenizer."""
    torch.manual_seed(0)
    model = ClipModel(architecture_config("vit-b-32")).eval()
    return ClipBundle(model, None, "none", 224, CLIP_MEAN, CLIP_STD, "random vit-b-32")


@pytest.fixture
def cpu_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(threads)


def _batch(bundle: ClipBundle, device: torch.device, items: int = ITEMS, groups: int = GROUPS) -> Inputs:
    """Token ids (EOS last), full attention masks, uint8 pixels and the items' groups (shuffled over ``groups``)."""
    generator = torch.Generator(device).manual_seed(0)
    text = bundle.model.config.text_config
    size = bundle.image_size
    input_ids = torch.randint(1, text.vocab_size - 1, (items, TEXT_TOKENS), generator=generator, device=device)
    input_ids[:, -1] = text.eos_token_id
    pixels = torch.randint(0, 256, (items, 3, size, size), generator=generator, device=device, dtype=torch.uint8)
    group_ids = torch.randperm(items, generator=torch.Generator().manual_seed(0)) % groups
    return input_ids, torch.ones_like(input_ids), pixels, RowGroups.per_row(group_ids, groups, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; off on CPU (the engine's CPU path is fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _forward(encoder: torch.nn.Module, inputs: Inputs) -> Callable[[], None]:
    device = inputs[0].device

    def run() -> None:
        with torch.inference_mode(), _autocast(device):
            encoder(*inputs)
        _sync(device)

    return run


def _train_step(encoder: torch.nn.Module, inputs: Inputs) -> Callable[[], None]:
    """Forward in train mode (LoRA dropout on) and backward of ``out.sum()`` into the adapters only."""
    device = inputs[0].device
    encoder.train()

    def run() -> None:
        encoder.zero_grad(set_to_none=True)
        with _autocast(device):
            out = encoder(*inputs)
        out.float().sum().backward()
        _sync(device)

    return run


class Paired:
    """Times ``baseline`` right before each benchmark round of ``subject``; records both and their ratios.

    Wall time is what pytest-benchmark reports. On CPU the process CPU time is recorded too (``cpu_*``):
    on a shared, oversubscribed box it does not count the time our threads wait descheduled, so its
    ratios are far steadier (at 1 thread it is the work done; at 2 it includes OpenMP spin-waits).
    """

    def __init__(self, subject: Callable[[], None], baseline: Callable[[], None], device: torch.device) -> None:
        self.subject, self.baseline = subject, baseline
        self.clocks = {"wall": time.perf_counter}
        if device.type == "cpu":
            self.clocks["cpu"] = time.process_time
        self.times: dict[str, dict[str, list[float]]] = {side: {c: [] for c in self.clocks} for side in ("s", "b")}

    def _timed(self, side: str, fn: Callable[[], None]) -> None:
        start = {name: clock() for name, clock in self.clocks.items()}
        fn()
        for name, clock in self.clocks.items():
            self.times[side][name].append(clock() - start[name])

    def run(self, benchmark, rounds: int, goal: float | None, warmup: int = 0) -> None:
        """``warmup`` untimed calls of each side, then ``rounds`` paired rounds; ratios into ``extra_info``."""
        for _ in range(warmup):
            self.baseline()
            self.subject()
        benchmark.pedantic(
            self._timed,
            setup=lambda: self._timed("b", self.baseline),
            args=("s", self.subject),
            rounds=rounds,
            iterations=1,
        )
        benchmark.extra_info.update(ratio_goal=goal, torch=torch.__version__, threads=torch.get_num_threads())
        for name in self.clocks:
            subject, baseline = self.times["s"][name], self.times["b"][name]
            ratios = [s / b for s, b in zip(subject, baseline, strict=True)]
            benchmark.extra_info.update(
                {
                    f"{name}_subject_min_s": min(subject),
                    f"{name}_subject_median_s": statistics.median(subject),
                    f"{name}_baseline_min_s": min(baseline),
                    f"{name}_baseline_median_s": statistics.median(baseline),
                    f"{name}_ratio_of_mins": min(subject) / min(baseline),
                    f"{name}_ratio_median_paired": statistics.median(ratios),
                }
            )


def _adapted(bundle: ClipBundle, peft: str, groups: int, device: torch.device) -> GroupedClipEncoder:
    return GroupedClipEncoder(bundle, peft, groups).to(device).eval()


def _forward_vs_frozen(benchmark, bundle: ClipBundle, peft: str, device: torch.device, **run: int) -> None:
    inputs = _batch(bundle, device)
    frozen = _forward(_adapted(bundle, "none", GROUPS, device), inputs)
    grouped = _forward(_adapted(bundle, peft, GROUPS, device), inputs)
    goal = 1.05 if peft == "lora" else None
    Paired(grouped, frozen, device).run(benchmark, goal=goal, **run)
    benchmark.extra_info.update(items=ITEMS, groups=GROUPS, peft=peft, baseline="frozen CLIP")


def _grouped_vs_global_training(benchmark, bundle: ClipBundle, device: torch.device, **run: int) -> None:
    grouped = _train_step(_adapted(bundle, "lora", GROUPS, device), _batch(bundle, device))
    single = _train_step(_adapted(bundle, "lora", 1, device), _batch(bundle, device, groups=1))
    Paired(grouped, single, device).run(benchmark, goal=1.10, **run)
    benchmark.extra_info.update(items=ITEMS, groups=GROUPS, peft="lora", baseline="one global LoRA (groups=1)")


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_grouped_forward_vs_frozen_cpu(benchmark, vit_b_32: ClipBundle, peft: str, cpu_threads: None) -> None:
    _forward_vs_frozen(benchmark, vit_b_32, peft, torch.device("cpu"), rounds=CPU_ROUNDS)


def test_grouped_lora_train_step_vs_global_cpu(benchmark, vit_b_32: ClipBundle, cpu_threads: None) -> None:
    _grouped_vs_global_training(benchmark, vit_b_32, torch.device("cpu"), rounds=CPU_ROUNDS)


def test_peft_mixed_batch_forward_vs_frozen_cpu(benchmark, vit_b_32: ClipBundle, cpu_threads: None) -> None:
    """For reference: HF peft LoRA with 8 adapters and per-row ``adapter_names`` (a loop over adapters per layer)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(copy.deepcopy(vit_b_32.model), config, adapter_name="group0")
    for group in range(1, GROUPS):
        model.add_adapter(f"group{group}", config)
    model.eval()
    input_ids, attention_mask, pixels, group_ids = inputs = _batch(vit_b_32, torch.device("cpu"))
    mean, std = torch.tensor(vit_b_32.image_mean), torch.tensor(vit_b_32.image_std)
    names = [f"group{group}" for group in group_ids.host.tolist()]

    def mixed() -> None:
        with torch.inference_mode():
            pixel_values = normalize_pixels(pixels, mean, std)
            model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, adapter_names=names)

    frozen = _forward(_adapted(vit_b_32, "none", GROUPS, torch.device("cpu")), inputs)
    Paired(mixed, frozen, torch.device("cpu")).run(benchmark, rounds=CPU_ROUNDS, goal=None)
    benchmark.extra_info.update(items=ITEMS, groups=GROUPS, peft="hf-peft lora adapter_names", baseline="frozen CLIP")


@needs_cuda
@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_grouped_forward_vs_frozen_cuda(benchmark, vit_b_32: ClipBundle, peft: str) -> None:
    _forward_vs_frozen(benchmark, vit_b_32, peft, torch.device("cuda"), rounds=CUDA_ROUNDS, warmup=CUDA_WARMUP)


@needs_cuda
def test_grouped_lora_train_step_vs_global_cuda(benchmark, vit_b_32: ClipBundle) -> None:
    _grouped_vs_global_training(benchmark, vit_b_32, torch.device("cuda"), rounds=CUDA_ROUNDS, warmup=CUDA_WARMUP)


def _encode_all_groups(encoder: GroupedClipEncoder, inputs: Inputs, chunk: int) -> Callable[[], torch.Tensor]:
    """Every group's embedding of every item, ``chunk`` items of one group per forward (as the engine does)."""
    input_ids, attention_mask, pixels, _ = inputs
    device, items = input_ids.device, input_ids.shape[0]

    def run() -> torch.Tensor:
        tables = torch.empty(GROUPS, items, 2 * encoder.clip.config.projection_dim, device=device)
        with torch.inference_mode(), _autocast(device):
            for group in range(GROUPS):
                for start in range(0, items, chunk):
                    part = slice(start, start + chunk)
                    ids = RowGroups.one(group, input_ids[part].shape[0], GROUPS, device)
                    tables[group, part] = encoder(input_ids[part], attention_mask[part], pixels[part], ids)
        _sync(device)
        return tables

    return run


@needs_cuda
def test_item_embeddings_all_groups_cuda(benchmark, vit_b_32: ClipBundle) -> None:
    """Arts-scale item tables: 18,884 items x 8 groups through grouped-LoRA ViT-B/32 (goal: under 10 s on an H100)."""
    device = torch.device("cuda")
    encoder = _adapted(vit_b_32, "lora", GROUPS, device)
    inputs = _batch(vit_b_32, device, items=ARTS_ITEMS)
    _encode_all_groups(encoder, (*(t[:ENCODE_CHUNK] for t in inputs[:3]), inputs[3]), ENCODE_CHUNK)()  # Triton compiles
    tables = benchmark.pedantic(_encode_all_groups(encoder, inputs, ENCODE_CHUNK), rounds=1, iterations=1)
    benchmark.extra_info.update(items=ARTS_ITEMS, groups=GROUPS, chunk=ENCODE_CHUNK, goal_s=10.0)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["items_x_groups_per_s"] = ARTS_ITEMS * GROUPS / benchmark.stats.stats.min
    assert torch.isfinite(tables).all()
