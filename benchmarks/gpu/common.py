"""What the GPU check's steps share: the device, figures tagged with it, and Arts-scale synthetic inputs.

The item inputs and the user sequences are built in memory (no JPEG is written or decoded): the check
times the engine's CLIP, training and embedding paths, not the one-off input-cache build, which
RESULTS.md measures on its own. `synthetic_inputs` returns the engine's own `ItemInputs` (so batches
take its pinned, non-blocking copy path) and `synthetic_dataset` its `Dataset`.
"""

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.shops import ARTS_SCALE
from perpeft.engine.clip.loading import ClipBundle
from perpeft.engine.clip.model import ClipConfig, ClipModel, TextConfig, VisionConfig
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.dataset import Dataset
from perpeft.engine.features.inputs import ItemInputs

from .figures import Figures as Figures  # re-exported: the steps take them from here
from .figures import device_label
from .figures import step_arguments as step_arguments

# Distinct random images behind the catalog's pixels (repeated): content does not matter for timing.
IMAGE_POOL = 2048
PEAK_NOTE = "CUDA: max allocated; CPU: peak RSS (engine PeakMemory)"


@dataclass(frozen=True)
class Scale:
    """Catalog and user counts of a check, with the shape of their synthetic purchases (as ``ShopSpec``)."""

    users: int
    items: int
    domains: int
    mean_purchases: float
    title_chars: tuple[int, int]


ARTS = Scale(ARTS_SCALE.users, ARTS_SCALE.items, ARTS_SCALE.domains, ARTS_SCALE.mean_purchases, ARTS_SCALE.title_chars)
SMOKE = Scale(users=120, items=60, domains=3, mean_purchases=9.4, title_chars=(4, 20))


def smoke_clip_config() -> ClipConfig:
    """A CLIP small enough for CPU smoke runs: 2 layers of 32 per tower, 16-px images, 16 tokens."""
    tower = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = TextConfig(
        **tower, vocab_size=99, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=98
    )
    return ClipConfig(text, VisionConfig(**tower, image_size=16, patch_size=8), projection_dim=8)


def random_clip(smoke: bool) -> ClipBundle:
    """Random-weight ViT-B/32 CLIP (``ClipConfig()``, 151 M parameters), or the smoke CLIP; no tokenizer
    (the synthetic inputs are token ids already)."""
    torch.manual_seed(0)
    config = smoke_clip_config() if smoke else ClipConfig()
    model = ClipModel(config).eval()
    name = "random smoke CLIP" if smoke else "random ViT-B/32"
    return ClipBundle(model, None, name, config.vision_config.image_size, CLIP_MEAN, CLIP_STD, name)


def synthetic_inputs(bundle: ClipBundle, items: int, title_chars: tuple[int, int], seed: int = 0) -> ItemInputs:
    """`ItemInputs` of ``items`` items (row 0 padding): titles of ``title_chars`` characters as one token per
    character (``write_byte_clip``'s byte-level tokenizer) between BOS and EOS, padded to the text length;
    random uint8 pixels at the bundle's image size; every item has both modalities."""
    rng = np.random.default_rng(seed)
    text = bundle.model.config.text_config
    width = text.max_position_embeddings
    input_ids = np.full((items + 1, width), text.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((items + 1, width), dtype=np.int64)
    lengths = np.minimum(rng.integers(title_chars[0], title_chars[1] + 1, size=items + 1) + 2, width)
    top = min(512, text.vocab_size - 2)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = [text.bos_token_id, *rng.integers(2, top, size=length - 2), text.eos_token_id]
        attention_mask[row, :length] = 1
    size = bundle.image_size
    pool = rng.integers(0, 256, size=(min(IMAGE_POOL, items), 3, size, size), dtype=np.uint8)
    pixels = pool[np.arange(items + 1) % len(pool)]
    pixels[0] = 0
    present = np.ones((items + 1, 2), dtype=bool)
    return ItemInputs(input_ids, attention_mask, pixels, present, Path("synthetic"))


def synthetic_dataset(scale: Scale, seed: int = 0) -> Dataset:
    """Users buying within one interest domain, popular items more often (``write_authors_release``'s
    distribution: at least 5 purchases, ``mean_purchases`` on average), as an engine `Dataset`."""
    rng = np.random.default_rng(seed)
    item_domain = rng.integers(0, scale.domains, size=scale.items)
    popularity = 1.0 / np.arange(1, scale.items + 1) ** 0.6
    rng.shuffle(popularity)
    user_domain = rng.integers(0, scale.domains, size=scale.users)
    counts = 5 + rng.geometric(1.0 / (scale.mean_purchases - 4.0), size=scale.users) - 1
    sequences: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * (scale.users + 1)
    for domain in range(scale.domains):
        members = np.flatnonzero(item_domain == domain)
        users = np.flatnonzero(user_domain == domain)
        # Weighted sampling without replacement for all the domain's users at once (Gumbel top-k).
        keys = np.log(popularity[members]) + rng.gumbel(size=(len(users), len(members)))
        order = np.argsort(-keys, axis=1)
        for user, ranked in zip(users, order, strict=True):
            sequences[user + 1] = members[ranked[: min(counts[user], len(members))]] + 1
    return Dataset(
        name="synthetic-arts" if scale == ARTS else "synthetic-smoke",
        root=Path("synthetic"),
        item_ids=[None, *(f"i{index}" for index in range(1, scale.items + 1))],
        titles=["", *("synthetic title" for _ in range(scale.items))],
        image_paths=[None] * (scale.items + 1),
        user_ids=[None, *(f"u{index}" for index in range(1, scale.users + 1))],
        sequences=sequences,
    )


class TimedInputs(ItemInputs):
    """`ItemInputs` that also add up the host time their ``batch`` calls take (gather, pin, copy launch),
    to tell input-bound from compute-bound passes; the engine treats them as any `ItemInputs`."""

    seconds = 0.0
    calls = 0

    @classmethod
    def of(cls, inputs: ItemInputs) -> "TimedInputs":
        fields = {field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs) if field.init}
        return cls(**fields)

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        tensors = super().batch(items, device)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return tensors

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def check_config(device: torch.device, groups: int = 8, **changes: Any) -> RunConfig:
    """The paper's run settings (LoRA r 4 on q/v, batch 16, lr 1e-4) on ``device``; precision ``auto``
    (bf16 autocast on CUDA) and SASRec uncompiled (``--compile off``: its first compile would dominate a
    timed epoch; SASRec is tiny next to CLIP)."""
    settings: dict[str, Any] = dict(
        data="synthetic",
        clip="random",
        peft="lora",
        groups=groups,
        epochs_global=1,
        epochs_perpeft=1,
        baseline=False,
        lr=1e-4,
        weight_decay=1e-4,
        device=str(device),
        precision="auto",
        compile="off",
    )
    return RunConfig(**{**settings, **changes}).resolved()


def check_device(smoke: bool) -> torch.device:
    """CUDA for a real check (SystemExit 2 without it); the CPU, one thread, for a smoke run (a tiny model on
    a shared 2-core box runs faster on one thread than on two that wait for each other)."""
    if smoke:
        torch.set_num_threads(1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (torch.cuda.is_available() is False); use --smoke for a CPU smoke run")
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    """What every figure names: the GPU's name, or ``cpu (smoke)``."""
    return device_label(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as clock: …`` then ``clock["seconds"]``."""
    clock = {"seconds": 0.0}
    started = time.perf_counter()
    try:
        yield clock
    finally:
        clock["seconds"] = time.perf_counter() - started
