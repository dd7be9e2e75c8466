"""Hidden host syncs in a training step, found with ``torch.cuda.set_sync_debug_mode``.

Random ViT-B/32, C = 8 LoRA groups, bf16 autocast, after warm-up steps (Triton compiles and cuBLAS
initialisation may synchronise once). Five cases:

- ``grouped path, mixed groups`` / ``grouped path, one group``: everything a training step computes on
  the device — grouped CLIP encoder (Triton LoRA), grouped projector, SASRec, fused BCE, backward, AdamW
  — with its inputs already on the device (item ids, their token ids and pixels, the sequence indices),
  the batch's groups shuffled over all 8 or all one group (as PerPEFT's homogeneous batches). These must
  not synchronise: the check fails if they do.
- ``grouped path, mixed groups, with a text padding mask``: the same with the titles' attention mask, as a
  catalog that is not right-padded gets it (`ItemInputs.right_padded`; a right-padded one gets none, since
  under CLIP's causal attention the pooled EOS output never sees padding). Transformers' CLIP text tower
  reads that mask on the host to decide whether SDPA may skip it (``masking_utils``:
  ``bool(mask.sum() == mask.numel())``): reported, not failed, as a library check outside the grouped path.
- ``engine training step`` (two PerPEFT batches through `train_epoch`) and ``engine item_vectors``
  (one mixed-group embed batch): the engine's own entry points, whose host-side bookkeeping is
  reported, not failed.

Each case runs once under mode ``error`` (the first synchronising op raises; its Python stack is
reported) and once under ``warn`` (every synchronising op's stack is recorded, grouped by call site with
its count; a site counted once per step in a two-step run shows twice).

Run: ``python -m benchmarks.gpu.sync_check --out sync.json`` (CUDA) or ``--smoke`` (CPU: the cases run,
but sync detection needs CUDA).
"""

import dataclasses
import functools
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import perpeft.engine
import perpeft.kernels
from perpeft.engine.data.sampler import TrainSampler
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.model.perpeft import ID_NORM_WEIGHT, PerpeftModel
from perpeft.engine.model.run_inputs import clip_encoder_factory
from perpeft.engine.train.stages import train_epoch
from perpeft.kernels.ops import bce_with_negatives

from .common import (
    SMOKE,
    Figures,
    Scale,
    check_config,
    check_device,
    random_clip,
    step_arguments,
    synthetic_dataset,
    synthetic_inputs,
)

SYNC_MESSAGE = "called a synchronizing CUDA operation"
PROJECT_DIRS = tuple(str(Path(module.__file__).parent) for module in (perpeft.engine, perpeft.kernels))
TORCH_DIR = str(Path(torch.__file__).parent)
WARMUP_STEPS = 2


@dataclass(frozen=True)
class SyncSite:
    """Where a synchronising op was called: the innermost Python frame, the innermost one outside torch's
    own Python code, and the innermost one in the engine or the kernels (each ``file:line function: code``)."""

    call: str
    library: str
    project: str

    @property
    def short(self) -> str:
        """The engine's or kernels' frame, else the library's."""
        return self.project if self.project != "-" else self.library

    @classmethod
    def from_frames(cls, frames: list[traceback.FrameSummary]) -> "SyncSite":
        def describe(predicate: Callable[[traceback.FrameSummary], bool]) -> str:
            for frame in reversed(frames):
                if predicate(frame):
                    return f"{frame.filename}:{frame.lineno} {frame.name}: {(frame.line or '').strip()}"
            return "-"

        return cls(
            call=describe(lambda frame: True),
            library=describe(lambda frame: not frame.filename.startswith(TORCH_DIR)),
            project=describe(lambda frame: frame.filename.startswith(PROJECT_DIRS)),
        )


@contextmanager
def sync_debug_mode(mode: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block, then back to the previous mode."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def first_sync(step: Callable[[], object]) -> SyncSite | None:
    """Run ``step`` under mode ``error``: the site of the op that raised, or None when none synchronised."""
    try:
        with sync_debug_mode("error"):
            step()
    except RuntimeError as error:
        if SYNC_MESSAGE not in str(error):
            raise
        return SyncSite.from_frames(traceback.extract_tb(error.__traceback__))
    return None


@contextmanager
def recorded_syncs() -> Iterator[Counter]:
    """Count, by `SyncSite`, every sync warning raised in the block (as mode ``warn`` issues them)."""
    sites: Counter = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        forward = warnings.showwarning

        def record(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if SYNC_MESSAGE not in str(message):
                forward(message, category, *args, **kwargs)
                return
            frames = [frame for frame in traceback.extract_stack()[:-1] if not frame.filename.endswith("warnings.py")]
            sites[SyncSite.from_frames(frames)] += 1

        warnings.showwarning = record
        yield sites


def all_syncs(step: Callable[[], object]) -> Counter:
    """Run ``step`` under mode ``warn``: every synchronising op's site with its count."""
    with recorded_syncs() as sites, sync_debug_mode("warn"):
        step()
    return sites


@dataclass
class DeviceBatch:
    """A training batch already on the device: distinct items with their inputs and group ids, and the
    sequence, positive and negative positions as rows into those items (what `training_loss` derives)."""

    items: torch.Tensor
    inputs: tuple[torch.Tensor | None, ...]  # token ids, attention mask (None: no padding mask), pixels
    groups: torch.Tensor
    seq: torch.Tensor
    rows: torch.Tensor  # [3, B, L]: rows of seq, pos and neg into ``items``

    @classmethod
    def build(
        cls, source: Any, num_items: int, users: int, groups: int, mixed: bool, device: torch.device
    ) -> "DeviceBatch":
        generator = torch.Generator().manual_seed(3)
        length = 10
        items = torch.randperm(num_items, generator=generator)[: 3 * users * length] + 1
        rows = torch.randperm(len(items), generator=generator).view(3, users, length)
        group_ids = (
            torch.randint(0, groups, (len(items),), generator=generator)
            if mixed
            else torch.full((len(items),), groups - 1)
        )
        tensors = source.batch(items, device)
        return cls(items.to(device), tensors, group_ids.to(device), items[rows[0]].to(device), rows.to(device))


def grouped_step(model: PerpeftModel, optimizer: torch.optim.Optimizer, batch: DeviceBatch) -> None:
    """`training_loss` + backward + AdamW on a device-resident batch (the item bookkeeping done already)."""
    device = batch.items.device
    recommender = model.recommender
    # bf16 autocast on CUDA, as PerpeftModel.item_vectors applies it around the encoder.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.autocast and device.type == "cuda"):
        encoded = model.encoder(*batch.inputs, batch.groups)
    vectors = recommender.item_vectors(batch.items, encoded.float(), batch.groups)[batch.rows]
    output = recommender.sequence_output(batch.seq, vectors[0])
    width = output.shape[-1]
    mask = torch.ones(output.shape[0] * output.shape[1], dtype=torch.bool, device=device)
    loss = bce_with_negatives(
        output.reshape(-1, width), vectors[1].reshape(-1, width), vectors[2].reshape(-1, width), mask
    )
    loss = loss + ID_NORM_WEIGHT * recommender.id_norm()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def check_case(figures: Figures, name: str, step: Callable[[], object], must_be_clean: bool, cuda: bool) -> None:
    """Warm up ``step``, then report its first sync (mode error) and all its syncs (mode warn)."""
    for _ in range(WARMUP_STEPS):
        step()
    if not cuda:
        step()
        figures.add(f"{name}: synchronising ops", "not checked", note="sync debug mode needs CUDA; the case ran")
        return
    first = first_sync(step)
    sites = all_syncs(step)
    total = sum(sites.values())
    figures.add(f"{name}: synchronising ops (mode warn)", total, "ops", "must be 0" if must_be_clean else "reported")
    figures.add(f"{name}: first synchronising op (mode error)", first.short if first else "none")
    figures.details[name] = {
        "first": first.__dict__ if first else None,
        "sites": [{**site.__dict__, "count": count} for site, count in sites.most_common()],
    }
    for site, count in sites.most_common():
        print(f"    {count}x  {site.project}\n        innermost: {site.call}\n        library:   {site.library}")
    if must_be_clean and (total or first):
        figures.fail(f"{name}: {total} synchronising op(s); first at {first.call if first else '?'}")


def main(argv: list[str] | None = None) -> int:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--users", type=int, default=4, help="Users per device-resident batch (3 x 10 items each).")
    args = parser.parse_args(argv)
    device = check_device(args.smoke)
    cuda = device.type == "cuda"
    figures = Figures("sync", device, args.smoke, args.out)
    bundle = random_clip(args.smoke)
    # A catalog as large as the batches need (distinct items): Arts' 18,884 would only cost memory.
    num_items = max(SMOKE.items, 3 * args.users * 10 * 2)
    inputs = synthetic_inputs(bundle, num_items, (40, 150))
    config = check_config(device, args.groups)
    model = PerpeftModel(config, clip_encoder_factory(config, bundle), inputs, num_items, args.groups).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)

    mixed = DeviceBatch.build(inputs, num_items, args.users, args.groups, True, device)
    one_group = DeviceBatch.build(inputs, num_items, args.users, args.groups, False, device)
    token_ids, _, pixels = mixed.inputs
    index = mixed.items.cpu().numpy()
    mask = torch.from_numpy(np.ascontiguousarray(inputs.attention_mask[index, : token_ids.shape[1]])).to(device)
    masked = dataclasses.replace(mixed, inputs=(token_ids, mask, pixels))
    cases = {
        "mixed groups": (mixed, True),
        "one group": (one_group, True),
        "mixed groups, with a text padding mask": (masked, False),
    }
    for label, (batch, must_be_clean) in cases.items():
        step = functools.partial(grouped_step, model, optimizer, batch)
        check_case(figures, f"grouped path, {label}", step, must_be_clean, cuda)

    scale = Scale(users=400, items=num_items, domains=4, mean_purchases=9.4, title_chars=(40, 150))
    split = leave_one_out(synthetic_dataset(scale).sequences)
    assignment = np.concatenate([[0], np.arange(scale.users) % args.groups]).astype(np.int64)
    sampler = TrainSampler(split.train, num_items, config.maxlen, config.batch_size, assignment, True)
    batches = sampler.epoch(np.random.default_rng(0))[:2]
    step = functools.partial(train_epoch, model, optimizer, batches, device, "sync check", False)
    check_case(figures, "engine training step (train_epoch, 2 PerPEFT batches)", step, False, cuda)
    items = torch.arange(1, 129)
    groups = torch.arange(128) % args.groups

    def embed_batch() -> None:
        with torch.no_grad():
            model.eval()
            model.item_vectors(items, groups)
            model.train()

    check_case(figures, "engine item_vectors (one mixed-group embed batch)", embed_batch, False, cuda)
    return figures.finish()


if __name__ == "__main__":
    raise SystemExit(main())
