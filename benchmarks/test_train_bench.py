"""The speed issue's job: step time with and without each lever, the end-to-end wall, and the research script.

The job: a synthetic shop of 900 users and 360 items (`benchmarks.shops.SHOP_900`: titles of 17–35
characters, 64-px JPEGs) and a local CLIP built from a config (64-d, 2 layers per tower, 32-px images,
patch 8, projection 512, a byte-level BPE tokenizer with no merges: one token per character, 77 at
most), LoRA r 4, C = 8, E1 10 + E2 20, batch 16, lr 1e-4, weight decay 1e-4, ``--no-baseline``, seed 0.

- ``test_step_levers``: ms per Global-PEFT training step (forward, backward, AdamW) over the same 20
  batches, with the engine as it is and with one lever undone at a time: token columns padded to 77
  instead of cut to the batch's longest title; SDPA attention under its math backend (the engine's
  choice before its bmm attention, `engine/clip/model.py`) instead of the engine's bmm attention; CLIP's QuickGELU instead of
  the SiLU fold; each tower's last layer at every position instead of the pooled one only
  (`engine/clip/pooled.py`); titles padded to the batch's longest instead of packed to their EOS
  (`engine/clip/pooled.py` `TitleRows`); the LoRA and loss ops through their registered operators instead of the references
  directly (`kernels/ops.py`); the for-loop AdamW instead of the fused one; 1 instead of 2 threads. Also on
  the demo (shipped tiny CLIP) for the thread count.
- ``test_evaluation_tables``: the 8 groups' item tables of one evaluation, items in chunks of similar
  title length with each group's LoRA merged into its layers (the engine), in id order, or with the
  LoRA branch run beside the base layer.
- ``test_job_end_to_end``: ``perpeft-engine train`` on the job in a subprocess, wall time and metrics.
- ``test_side_by_side_with_research_script``: the authors' ``perpeft_lora_ia3.py`` on the same files
  (its clone given by ``$PERPEFT_PEER_CLONE``; skipped otherwise), then the engine, one after the other.

Run on an idle machine (``uptime``): ``pytest benchmarks/test_train_bench.py --benchmark-enable -s``;
the shop and CLIP are written once under ``$PERPEFT_BENCH_DIR`` (default: the engine cache's ``bench/``).
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.peers.research_scripts import run_research_script
from benchmarks.shops import SHOP_900, bench_root, write_byte_clip, write_shop
from perpeft.engine.clip import model as clip_model
from perpeft.engine.clip import pooled
from perpeft.engine.clip.model import QUICK_GELU_SLOPE, QuickGELU
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sampler import TrainSampler
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.features.inputs import ItemInputs
from perpeft.engine.model import encoders
from perpeft.engine.model.adapters.context import GroupContext
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import RunInputs, load_run_inputs
from perpeft.kernels import ops

STEPS, WARMUP, ROUNDS = 20, 3, 5
JOB = {"peft": "lora", "groups": 8, "epochs_global": 10, "epochs_perpeft": 20, "batch_size": 16, "lr": 1e-4}


@pytest.fixture(scope="module")
def shop() -> Path:
    return write_shop(bench_root() / "shop-900", SHOP_900)


@pytest.fixture(scope="module")
def clip() -> Path:
    return write_byte_clip(bench_root() / "byte-clip-64d")


@pytest.fixture
def threads() -> Iterator[None]:
    """Restore the thread count a case changed."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@dataclass
class PlainInputs:
    """The item inputs behind a plain source: `PerpeftModel.item_tables` keeps item-id order, and with
    ``full_width`` every batch carries all 77 token columns, as before the column cut."""

    inputs: ItemInputs
    full_width: bool

    @property
    def has_missing(self) -> bool:
        return self.inputs.has_missing

    def modalities(self, items: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.inputs.modalities(items, device)

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        if not self.full_width:
            return self.inputs.batch(items, device)
        index = items.numpy()
        arrays = (self.inputs.input_ids, self.inputs.attention_mask, self.inputs.pixels)
        return tuple(torch.from_numpy(np.ascontiguousarray(array[index])) for array in arrays)


def job_config(data: str, clip: str) -> RunConfig:
    return RunConfig(data=data, clip=clip, device="cpu", **JOB).resolved()


def unfold_quick_gelu(clip: torch.nn.Module) -> None:
    """Undo `engine.clip.layers.fold_quick_gelu` on an encoder's CLIP copy: QuickGELU again, fc1 and fc2 rescaled back."""
    for module in clip.modules():
        if isinstance(getattr(module, "activation_fn", None), torch.nn.SiLU):
            fc1 = getattr(module.fc1, "base", module.fc1)
            with torch.no_grad():
                fc1.weight.div_(QUICK_GELU_SLOPE)
                fc1.bias.div_(QUICK_GELU_SLOPE)
                module.fc2.weight.mul_(QUICK_GELU_SLOPE)
            module.activation_fn = QuickGELU()


def step_model(config: RunConfig, run_inputs: RunInputs, settings: dict[str, object]) -> PerpeftModel:
    torch.manual_seed(0)
    inputs = PlainInputs(run_inputs.inputs, full_width=True) if settings["full_width"] else run_inputs.inputs
    model = PerpeftModel(config, run_inputs.make_encoder, inputs, run_inputs.dataset.num_items, 1).train()
    if not settings["fold_quick_gelu"]:
        unfold_quick_gelu(model.encoder.clip)
    return model


def full_text_tower(
    text_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, packing: object = None
):
    return text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def full_image_tower(vision_model: torch.nn.Module, pixel_values: torch.Tensor):
    return vision_model(pixel_values=pixel_values).pooler_output


@contextlib.contextmanager
def patched(module: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def sdpa_attend(
    attention: clip_model.ClipAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    weights: bool = False,
) -> tuple[torch.Tensor, None]:
    """`engine.clip.model.attend` as torch's SDPA on every device (the engine's attention before its CPU path)."""
    return clip_model.sdpa(attention, query, key, value, mask, is_causal), None


@contextlib.contextmanager
def sdpa_attention() -> Iterator[None]:
    """CLIP's attention through SDPA, and the pooled layer's keys and values projected (the fold needs the
    engine's attention)."""
    with (
        patched(clip_model, "attend", sdpa_attend),
        patched(pooled, "attend", sdpa_attend),
        patched(pooled, "_folds", lambda attention, rows: False),
    ):
        yield


@contextlib.contextmanager
def full_towers() -> Iterator[None]:
    """The item encoder runs each tower's last layer at every position (the towers' forward), as before
    `engine/clip/pooled.py`."""
    with patched(encoders, "pooled_text", full_text_tower), patched(encoders, "pooled_image", full_image_tower):
        yield


ENGINE = {
    "full_width": False,
    "attention": "engine",
    "fold_quick_gelu": True,
    "pooled_last_layer": True,
    "packed_titles": True,
    "eager_reference": True,
    "fused_adamw": True,
    "threads": 2,
}
LEVERS = {
    "engine": {},
    "no token-column cut": {"full_width": True},
    "SDPA math-backend attention": {"attention": "sdpa-math"},
    "QuickGELU not folded into SiLU": {"fold_quick_gelu": False},
    "last layer at every position": {"pooled_last_layer": False},
    "titles padded, not packed": {"packed_titles": False},
    "registered operators in eager": {"eager_reference": False},
    "for-loop AdamW": {"fused_adamw": False},
    "1 thread": {"threads": 1},
}


@dataclass
class LeverCase:
    """One lever setting's model, optimizer and attention context, trained on the shared batches."""

    settings: dict[str, object]
    model: PerpeftModel
    optimizer: torch.optim.Optimizer
    seconds: list[float]

    def train(self, batches: list) -> None:
        torch.set_num_threads(self.settings["threads"])
        # The engine's previous attention: SDPA under its math backend (faster than SDPA's CPU flash kernel).
        math_only = self.settings["attention"] == "sdpa-math"
        with contextlib.ExitStack() as stack:
            if math_only:
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                stack.enter_context(sdpa_attention())
            if not self.settings["pooled_last_layer"]:
                stack.enter_context(full_towers())
            if not self.settings["packed_titles"]:
                stack.enter_context(patched(encoders, "packed_title_rows", lambda *inputs: None))
            if not self.settings["eager_reference"]:
                stack.enter_context(patched(ops, "_eager_reference", lambda tensor: False))
            started = time.perf_counter()
            for batch in batches:
                loss = self.model(batch, torch.device("cpu"))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self.seconds.append(time.perf_counter() - started)


@pytest.mark.parametrize("shape", ["shop", "demo"])
def test_step_levers(benchmark, shop: Path, clip: Path, threads: None, shape: str) -> None:
    """Every lever's model trains the same batches, round after round in turn, so that a slow spell of the
    machine hits all of them alike; the figure of each is its fastest round."""
    levers = LEVERS if shape == "shop" else {name: LEVERS[name] for name in ("engine", "1 thread")}
    config = job_config(str(shop), str(clip)) if shape == "shop" else RunConfig(device="cpu").resolved()
    run_inputs = load_run_inputs(config, run_dataset(config), progress=False)
    split = leave_one_out(run_inputs.dataset.sequences)
    sampler = TrainSampler(split.train, run_inputs.dataset.num_items, config.maxlen, config.batch_size)
    batches = sampler.epoch(np.random.default_rng(0))[: WARMUP + STEPS]
    cases = {}
    for name, lever in levers.items():
        settings = {**ENGINE, **lever}
        model = step_model(config, run_inputs, settings)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trained, lr=config.lr, weight_decay=config.weight_decay, fused=settings["fused_adamw"]
        )
        cases[name] = LeverCase(settings, model, optimizer, [])
        cases[name].train(batches[:WARMUP])
        cases[name].seconds.clear()

    def one_round() -> None:
        for case in cases.values():
            case.train(batches[WARMUP:])

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    ms_per_step = {name: min(case.seconds) / STEPS * 1000 for name, case in cases.items()}
    benchmark.extra_info.update(shape=shape, steps=STEPS, rounds=ROUNDS, ms_per_step_min=ms_per_step)
    for name, value in ms_per_step.items():
        print(f"\n{shape} · {name}: {value:.1f} ms/step (min of {ROUNDS})", end="")
    print()


@pytest.mark.parametrize("variant", ["engine", "by item id", "LoRA branch, not merged"])
def test_evaluation_tables(
    benchmark, shop: Path, clip: Path, threads: None, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    torch.set_num_threads(2)
    config = job_config(str(shop), str(clip))
    run_inputs = load_run_inputs(config, run_dataset(config), progress=False)
    inputs = PlainInputs(run_inputs.inputs, full_width=False) if variant == "by item id" else run_inputs.inputs
    if variant == "LoRA branch, not merged":
        monkeypatch.setattr(GroupContext, "shared_group", lambda context, groups: None)
    torch.manual_seed(0)
    model = PerpeftModel(config, run_inputs.make_encoder, inputs, run_inputs.dataset.num_items, config.groups).eval()
    tables = benchmark.pedantic(
        model.item_tables, args=(run_inputs.dataset.num_items, config.encode_batch_size), rounds=5
    )
    benchmark.extra_info.update(variant=variant, groups=config.groups, items=run_inputs.dataset.num_items)
    assert tables.shape == (config.groups, run_inputs.dataset.num_items + 1, config.hidden)
    print(f"\nevaluation tables ({variant}): {benchmark.stats.stats.min:.3f} s (min of 5)")


def train_job(shop: Path, clip: Path, out: Path) -> dict[str, object]:
    """``perpeft-engine train`` on the job in a fresh process; wall time, metrics and per-stage train time."""
    command = [
        *(sys.executable, "-m", "perpeft.cli", "train", "--data", str(shop), "--clip", str(clip), "--peft", "lora"),
        *("--groups", "8", "--epochs-global", "10", "--epochs-perpeft", "20", "--batch-size", "16"),
        *("--lr", "1e-4", "--weight-decay", "1e-4", "--no-baseline", "--seed", "0", "--device", "cpu"),
        *("--quiet", "--overwrite", "--out", str(out)),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    state = json.loads((out / "state.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = {stage: sum(epoch["seconds"] for epoch in state[stage]["history"]) for stage in ("global", "perpeft")}
    train = {stage: sum(epoch["train_seconds"] for epoch in state[stage]["history"]) for stage in ("global", "perpeft")}
    return {"wall_seconds": wall, "stage_seconds": seconds, "train_seconds": train, "metrics": metrics}


def test_job_end_to_end(benchmark, shop: Path, clip: Path, tmp_path: Path) -> None:
    result = benchmark.pedantic(train_job, args=(shop, clip, tmp_path / "run"), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\nengine: {result['wall_seconds']:.1f} s wall; {json.dumps(result['train_seconds'])}")


@pytest.mark.skipif(
    not os.environ.get("PERPEFT_PEER_CLONE"), reason="set PERPEFT_PEER_CLONE to a kswoo97/PerPEFT clone"
)
def test_side_by_side_with_research_script(benchmark, shop: Path, clip: Path, tmp_path: Path) -> None:
    def both() -> dict[str, object]:
        peer = run_research_script(
            Path(os.environ["PERPEFT_PEER_CLONE"]), shop.parent / "release", clip, tmp_path / "peer", epochs_perpeft=20
        )
        engine = train_job(shop, clip, tmp_path / "engine")
        return {"research_script": peer, "engine": engine, "ratio": peer["wall_seconds"] / engine["wall_seconds"]}

    result = benchmark.pedantic(both, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    engine_test = result["engine"]["metrics"]["perpeft"]["test"]
    print(
        f"\nresearch script {result['research_script']['wall_seconds']:.1f} s, engine "
        f"{result['engine']['wall_seconds']:.1f} s: {result['ratio']:.2f}×; PerPEFT test NDCG@20 "
        f"research {result['research_script']['test']['NDCG@20']:.4f}, engine {engine_test['NDCG@20']:.4f}"
    )
