"""`embed`'s item tables: C groups in mixed-group batches against C frozen-CLIP passes over the same items.

Random-weight CLIP with ViT-B/32 shapes (``ClipConfig()``: 224-px images, titles padded to 77 tokens),
C = 2 groups, 32 items, 32 (item, group) pairs per pass, adapters randomised. The frozen baseline is the
same code on a one-group model without adapters (Frozen MM's encoder: CLIP, projector, ID embeddings),
so the ratio isolates what the grouped adapters add. Each round times a frozen table then the grouped
tables, back to back; the ratio is the median over ``ROUNDS`` rounds of grouped / (C × frozen), pairing
runs that saw the same machine load. Cost goal: ratio ≤ 1.1, read from ``extra_info["median_ratio"]``
(not asserted: on a shared 2-core box the per-round ratios spread over ±25%).

Run: ``pytest benchmarks/test_embed_bench.py --benchmark-enable``.
"""

import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from perpeft.engine.clip.loading import ClipBundle
from perpeft.engine.clip.model import ClipConfig, ClipModel, TextConfig
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import clip_encoder_factory
from perpeft.engine.serve.embed import grouped_item_tables

ITEMS, GROUPS, BATCH_PAIRS, ROUNDS = 32, 2, 32, 5
TOKENS, IMAGE_SIZE = 77, 224


@pytest.fixture(scope="module")
def bundle() -> ClipBundle:
    torch.manual_seed(0)
    model = ClipModel(ClipConfig()).eval()
    return ClipBundle(model, None, "random", IMAGE_SIZE, CLIP_MEAN, CLIP_STD, "random ViT-B/32")


class RandomCatalog:
    """Titles of 8–30 tokens (BOS … EOS, padded to 77) and random uint8 images; row 0 is padding."""

    def __init__(self, text: TextConfig) -> None:
        rng = np.random.default_rng(0)
        self.input_ids = np.full((ITEMS + 1, TOKENS), text.pad_token_id, dtype=np.int64)
        self.attention_mask = np.zeros((ITEMS + 1, TOKENS), dtype=np.int64)
        for row, length in enumerate(rng.integers(8, 31, size=ITEMS + 1)):
            words = rng.integers(0, text.bos_token_id, size=length - 2)
            self.input_ids[row, :length] = [text.bos_token_id, *words, text.eos_token_id]
            self.attention_mask[row, :length] = 1
        self.pixels = rng.integers(0, 256, size=(ITEMS + 1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        index = items.numpy()
        return tuple(torch.from_numpy(array[index]) for array in (self.input_ids, self.attention_mask, self.pixels))


@pytest.fixture(scope="module")
def catalog(bundle) -> RandomCatalog:
    return RandomCatalog(bundle.model.config.text_config)


def build(bundle: ClipBundle, catalog: RandomCatalog, peft: str, groups: int) -> PerpeftModel:
    config = RunConfig(clip="random", peft=peft, groups=groups, device="cpu", precision="fp32")
    model = PerpeftModel(config, clip_encoder_factory(config, bundle), catalog, ITEMS, groups).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.encoder.adapter_state().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model


def timed(function: Callable[[], object], times: list[float]) -> Callable[[], None]:
    def run() -> None:
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)

    return run


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_grouped_tables_against_frozen_clip(benchmark, bundle, catalog, peft):
    grouped_model = build(bundle, catalog, peft, GROUPS)
    frozen_model = build(bundle, catalog, "none", 1)
    grouped_times: list[float] = []
    frozen_times: list[float] = []
    time_grouped = timed(lambda: grouped_item_tables(grouped_model, ITEMS, BATCH_PAIRS), grouped_times)
    time_frozen = timed(lambda: grouped_item_tables(frozen_model, ITEMS, BATCH_PAIRS), frozen_times)
    benchmark.pedantic(time_grouped, setup=time_frozen, rounds=ROUNDS)
    ratios = [grouped / (GROUPS * frozen) for grouped, frozen in zip(grouped_times, frozen_times, strict=True)]
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(
        clip="random ViT-B/32",
        items=ITEMS,
        groups=GROUPS,
        batch_pairs=BATCH_PAIRS,
        threads=torch.get_num_threads(),
        frozen_s=frozen_times,
        grouped_s=grouped_times,
        paired_ratios=ratios,
        median_ratio=ratio,
    )
