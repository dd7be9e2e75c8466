"""One epoch of IISAN against one epoch of LoRA (Global PEFT, C = 1), once IISAN's hidden-state cache exists.

The item encoder is a random-weight ViT-B/32 CLIP (``openai/clip-vit-base-patch32``'s architecture, 151 M
parameters, 224 px images, 77-token titles) over a 1,000-item catalog, so CLIP's cost is realistic.
Both methods train the same ``BATCHES`` fixed batches from one sampler epoch; one benchmark round is
those steps (loss, backward, AdamW step), and ``extra_info["epoch_s"]`` extrapolates the round's time
linearly to an epoch of ``EPOCH_USERS`` users (every step does the same kind of work).

Batches hold ``USERS_PER_BATCH`` = 4 users, not the paper's 16: LoRA backpropagates through both towers
and keeps about 0.1 GB of fp32 activations per distinct item of a batch, so 16 users (~250 items) would
need ~25 GB on CPU. IISAN's fixed per-step cost (SASRec, optimizer) weighs more in small batches, so the
ratio measured here understates its advantage. The one-off cache build (a no-grad CLIP pass over the
catalog) is timed once and recorded as ``extra_info["cache_build_s"]``.

Run: ``pytest benchmarks/test_iisan_bench.py --benchmark-enable`` (about 15 minutes on 2 CPU cores).
"""

import math
import time
import zlib

import numpy as np
import pytest
import torch

from perpeft.engine.clip.loading import ClipBundle, architecture_config
from perpeft.engine.clip.model import ClipModel
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sampler import Batch, TrainSampler
from perpeft.engine.features.hidden_states import load_hidden_states
from perpeft.engine.features.inputs import ItemInputs
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import clip_encoder_factory, iisan_encoder_factory

ITEMS = 1_000
EPOCH_USERS = 1_000
USERS_PER_BATCH = 4
BATCHES = 2
MAXLEN = 10
IMAGE_SIZE = 224
TEXT_LENGTH, BOS, EOS = 77, 49_406, 49_407  # CLIP's layout; the config's legacy eos id 2 pools at argmax
DEVICE = torch.device("cpu")


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """bos, one stable id per word, eos, zero padding, ``[N, 77]``."""
    ids = np.zeros((len(texts), TEXT_LENGTH), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        tokens = [BOS, *(1 + zlib.crc32(word.encode()) % (BOS - 1) for word in text.split()), EOS][:TEXT_LENGTH]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CLIP, the catalog's inputs, the built hidden-state cache and the fixed training batches."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    bundle = ClipBundle(
        ClipModel(architecture_config("vit-b-32")).eval(), tokenize, "bench", IMAGE_SIZE, CLIP_MEAN, CLIP_STD, "bench"
    )
    words = [f"word{k}" for k in range(500)]
    titles = ["", *(" ".join(rng.choice(words, size=rng.integers(6, 16))) for _ in range(ITEMS))]
    input_ids, attention_mask = tokenize(titles)
    pixels = rng.integers(0, 256, size=(ITEMS + 1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    pixels[0] = 0
    root = tmp_path_factory.mktemp("iisan-bench")
    present = np.ones((ITEMS + 1, 2), dtype=bool)  # every item has its image and title
    inputs = ItemInputs(input_ids, attention_mask, pixels, present, root / "bench-catalog")
    patch = pytest.MonkeyPatch()
    patch.setenv("PERPEFT_CACHE", str(root / "cache"))
    started = time.perf_counter()
    states = load_hidden_states(bundle, inputs, DEVICE, progress=False)
    build_seconds = time.perf_counter() - started
    patch.undo()
    train = [np.empty(0, dtype=np.int64)]
    train += [rng.choice(np.arange(1, ITEMS + 1), size=rng.integers(6, 11), replace=False) for _ in range(EPOCH_USERS)]
    sampler = TrainSampler(train, ITEMS, MAXLEN, USERS_PER_BATCH)
    batches = [batch for _, batch in zip(range(BATCHES), sampler.epoch(np.random.default_rng(1)), strict=False)]
    return {"bundle": bundle, "inputs": inputs, "states": states, "batches": batches, "build_seconds": build_seconds}


def _distinct_items(batch: Batch) -> int:
    items = np.unique(np.concatenate([batch.seq, batch.pos, batch.neg], axis=None))
    return int((items != 0).sum())


@pytest.mark.parametrize("peft", ["lora", "iisan"])
def test_epoch(benchmark, world: dict, peft: str) -> None:
    config = RunConfig(data="bench", clip="bench", peft=peft, groups=1, device="cpu", precision="fp32")
    if peft == "iisan":
        make_encoder, source = iisan_encoder_factory(world["states"]), world["states"]
    else:
        make_encoder, source = clip_encoder_factory(config, world["bundle"]), world["inputs"]
    torch.manual_seed(0)
    model = PerpeftModel(config, make_encoder, source, ITEMS, groups=1).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)

    def one_round() -> None:
        for batch in world["batches"]:
            loss = model.training_loss(batch, DEVICE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    benchmark.group = "IISAN vs LoRA: fixed training steps, ViT-B/32, 1,000 items"
    # LoRA's round takes minutes and varies little; IISAN's takes well under a second.
    benchmark.pedantic(one_round, rounds=1 if peft == "lora" else 7, warmup_rounds=0 if peft == "lora" else 1)
    if benchmark.disabled:
        return
    round_seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        {
            "steps_per_round": BATCHES,
            "users_per_batch": USERS_PER_BATCH,
            "distinct_items_per_batch": [_distinct_items(batch) for batch in world["batches"]],
            "epoch_users": EPOCH_USERS,
            "epoch_s": round_seconds / BATCHES * math.ceil(EPOCH_USERS / USERS_PER_BATCH),
            "cache_build_s": world["build_seconds"] if peft == "iisan" else None,
        }
    )
