"""Hidden host syncs in the engine's training step, found with ``torch.cuda.set_sync_debug_mode``.

Every case runs the engine's own step as a stage does: ``train_epoch(model, optimizer, batches, device,
description, progress=True)`` (`perpeft.engine.train.stages`; progress on, as the CLI trains) over
``STEPS`` batches of the engine's `TrainSampler`, with the engine's optimizer (fused AdamW over
`parameter_groups`, as `StageRunner` builds it). Random ViT-B/32 CLIP (the smoke CLIP under ``--smoke``),
C = 8 groups, bf16 autocast on CUDA, a 240-item synthetic catalog in memory. Cases, most valuable first
(each one's figures are saved as soon as it is done):

- ``lora, PerPEFT C = 8, group-homogeneous batches``: PerPEFT's sampler (one group per batch, group
  negatives);
- ``lora, PerPEFT C = 8, mixed-group batches``: the same step with each distinct item of a batch under
  a group of its own (a fixed random item → group map): the model's ``item_vectors`` gets per-row host
  group ids, as embedding and evaluation call it, in place of the batch's one group (``training_loss``'s
  call is redirected for this case; the case fails if it no longer goes through ``item_vectors``);
- ``ia3, PerPEFT C = 8, group-homogeneous batches``;
- ``iisan, PerPEFT C = 8, group-homogeneous batches``: IISAN's side network over hidden states laid out
  as its cache holds them (random, in memory: their values do not matter here);
- ``frozen-mm`` (Frozen MM: CLIP's outputs computed once by the engine's ``encode_frozen``, then looked up)
  and ``wo-mm`` (w/o MM: ID embeddings only), one group, the plain sampler;
- ``lora, with a text padding mask`` (reported, not failed): a catalog that is not right-padded gets the
  titles' attention mask (`ItemInputs.right_padded`), and the CLIP text tower reads it on the host to
  decide whether SDPA may skip it (`perpeft.engine.clip.model.text_attention_mask`: ``bool(keep.all())``);
- ``engine group_vectors, one embed batch`` (reported, not failed): the embed path (every group of 128 items), no grad.

How syncs are counted. One ``train_epoch`` call over the batches warms up (Triton compiles, cuBLAS and
the allocator, AdamW's state), then the same call runs once under mode ``error`` (the first synchronising
op raises; its Python stack is kept) and once under mode ``warn`` (every synchronising op's stack is
recorded, grouped by call site with its count). Each site is placed by the line of ``train_epoch`` it ran
under: a line inside ``train_epoch``'s loop (found from its source with ``ast`` at import, so the check
follows its edits) is a **step** sync and fails the case; a line outside the loop is the epoch's own
work — the one read of the summed loss and of the first non-finite step after the last step — allowed,
and reported, as long as there are fewer of them per call than steps (more would be a per-step read moved
out of the loop). Without CUDA (``--smoke``) the cases run but nothing is counted.

Run: ``python -m benchmarks.gpu.sync_check --out sync.json`` (CUDA) or ``--smoke`` (CPU).
"""

import ast
import dataclasses
import gc
import inspect
import textwrap
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
from perpeft.engine.data.sampler import Batch, TrainSampler
from perpeft.engine.data.split import leave_one_out
from perpeft.engine.features.hidden_states import HiddenStates, iisan_state_count
from perpeft.engine.features.inputs import ItemInputs
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.model.run_inputs import clip_encoder_factory, encode_frozen, iisan_encoder_factory
from perpeft.engine.train.progress import TqdmBars
from perpeft.engine.train.stages import parameter_groups, train_epoch

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
STEPS = 3  # batches per train_epoch call


def loop_lines(function: Callable[..., Any]) -> tuple[str, list[range]]:
    """``function``'s source file and the line ranges of its loops (``for``/``while``, nested ones too)."""
    function = inspect.unwrap(function)
    lines, first = inspect.getsourcelines(function)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    loops = (node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.AsyncFor, ast.While)))
    return inspect.getsourcefile(function) or "", [
        range(node.lineno + first - 1, (node.end_lineno or node.lineno) + first) for node in loops
    ]


EPOCH_FILE, STEP_LINES = loop_lines(train_epoch)


def train_with_bars(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any], device: torch.device, name: str
) -> None:
    """`train_epoch` over ``batches`` as a stage runs it with its progress bars on (the loss read each step)."""
    bars = TqdmBars()
    bars.epoch_started(name, 1, 1, len(batches))
    train_epoch(model, optimizer, batches, device, bars)


def phase_of(frames: list[traceback.FrameSummary]) -> str:
    """Where under ``train_epoch`` a sync ran: ``step`` (inside its loop; also when it has no loop to tell
    by), ``epoch`` (outside the loop: the epoch's own reads) or ``-`` (not under ``train_epoch``)."""
    for frame in reversed(frames):
        if frame.name == train_epoch.__name__ and frame.filename == EPOCH_FILE:
            if not STEP_LINES or any(frame.lineno in lines for lines in STEP_LINES):
                return "step"
            return "epoch"
    return "-"


@dataclass(frozen=True)
class SyncSite:
    """Where a synchronising op was called: the innermost Python frame, the innermost one outside torch's
    own Python code, the innermost one in the engine or the kernels (each ``file:line function: code``),
    and its `phase_of` ``train_epoch``."""

    call: str
    library: str
    project: str
    phase: str = "-"

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
            phase=phase_of(frames),
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


def check_case(
    figures: Figures, name: str, step: Callable[[], object], must_be_clean: bool, cuda: bool, steps: int | None
) -> None:
    """Warm ``step`` up, then record its first sync (mode error) and all its syncs (mode warn). ``steps``:
    the training steps one call runs (None when ``step`` is not a ``train_epoch`` call); the case fails
    (when ``must_be_clean``) on any sync inside a step, or on as many epoch-level syncs as steps."""
    step()
    if not cuda:
        step()
        figures.add(f"{name}: synchronising ops", "not checked", note="sync debug mode needs CUDA; the case ran")
        return
    first = first_sync(step)
    sites = all_syncs(step)
    in_steps = sum(count for site, count in sites.items() if site.phase != "epoch")
    per_epoch = sum(count for site, count in sites.items() if site.phase == "epoch")
    label = "in the steps" if steps is not None else "in all"
    figures.add(
        f"{name}: synchronising ops {label} (mode warn)",
        in_steps,
        "ops",
        "must be 0" if must_be_clean else "reported",
    )
    if steps is not None:
        figures.add(
            f"{name}: per-epoch syncs after the last step (mode warn)",
            per_epoch,
            "ops",
            f"the epoch's loss read: allowed while fewer than its {steps} steps",
        )
    where = f"{first.short} ({first.phase})" if first else "none"
    figures.add(f"{name}: first synchronising op (mode error)", where)
    figures.details[name] = {
        "first": dataclasses.asdict(first) if first else None,
        "sites": [{**dataclasses.asdict(site), "count": count} for site, count in sites.most_common()],
    }
    for site, count in sites.most_common():
        print(
            f"    {count}x [{site.phase}] {site.project}\n        innermost: {site.call}\n"
            f"        library:   {site.library}"
        )
    if not must_be_clean:
        return
    if in_steps or (first is not None and first.phase != "epoch"):
        at = first.call if first is not None and first.phase != "epoch" else "see the sites"
        figures.fail(f"{name}: {in_steps} synchronising op(s) inside the training steps; first at {at}")
    elif steps is not None and per_epoch >= steps:
        figures.fail(f"{name}: {per_epoch} epoch-level syncs for {steps} steps: a per-step read outside the loop?")


@contextmanager
def mixed_groups(model: PerpeftModel, item_group: torch.Tensor, calls: list[int]) -> Iterator[None]:
    """For the block, ``model.item_vectors(items, group)`` ignores ``group`` and sees each item under its
    ``item_group`` (per-row host ids), so the engine's ``training_loss`` trains a batch of mixed groups."""

    def item_vectors(items: torch.Tensor, group: int | torch.Tensor, with_ids: bool = True) -> torch.Tensor:
        calls[0] += 1
        return PerpeftModel.item_vectors(model, items, item_group[items.cpu()], with_ids)

    model.item_vectors = item_vectors  # an instance attribute: training_loss's self.item_vectors finds it
    try:
        yield
    finally:
        del model.item_vectors


def random_hidden_states(bundle: Any, items: int) -> HiddenStates:
    """Hidden states in the layout of IISAN's cache (``[I+1, n, d]`` per tower, row 0 zero), random."""
    config = bundle.model.config
    count = iisan_state_count(config)
    rng = np.random.default_rng(2)
    text = rng.standard_normal((items + 1, count, config.text_config.hidden_size), dtype=np.float32)
    image = rng.standard_normal((items + 1, count, config.vision_config.hidden_size), dtype=np.float32)
    text[0], image[0] = 0.0, 0.0
    return HiddenStates(text, image, Path("synthetic"))


def not_right_padded(inputs: ItemInputs) -> ItemInputs:
    """``inputs`` with one title's mask holed (item 1, column 1): the catalog then carries its padding mask."""
    mask = np.array(inputs.attention_mask, copy=True)
    mask[1, 1] = 0
    masked = dataclasses.replace(inputs, attention_mask=mask)
    assert not masked.right_padded
    return masked


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="Users per batch (paper: 16).")
    args = parser.parse_args(argv)
    device = check_device(args.smoke)
    cuda = device.type == "cuda"
    figures = Figures("sync", device, args.smoke, args.out)
    groups = args.groups
    figures.details.update(
        steps_per_call=STEPS, train_epoch=f"{EPOCH_FILE}, loop lines {[(r.start, r.stop - 1) for r in STEP_LINES]}"
    )
    bundle = random_clip(args.smoke)
    num_items = max(SMOKE.items, 240)  # distinct items enough for the batches; Arts' 18,884 would only cost memory
    inputs = synthetic_inputs(bundle, num_items, (40, 150))
    scale = Scale(users=400, items=num_items, domains=4, mean_purchases=9.4, title_chars=(40, 150))
    split = leave_one_out(synthetic_dataset(scale).sequences)
    assignment = np.concatenate([[0], np.arange(scale.users) % groups]).astype(np.int64)

    def batches(grouped: bool, config: Any) -> list[Batch]:
        if grouped:
            sampler = TrainSampler(split.train, num_items, config.maxlen, config.batch_size, assignment, True)
        else:
            sampler = TrainSampler(split.train, num_items, config.maxlen, config.batch_size)
        return sampler.epoch(np.random.default_rng(0))[:STEPS]

    def case(
        name: str,
        config: Any,
        build: Callable[[], PerpeftModel],
        grouped: bool,
        must_be_clean: bool = True,
        around: Callable[[PerpeftModel], Any] | None = None,
    ) -> PerpeftModel:
        torch.manual_seed(0)
        model = build().to(device)
        optimizer = torch.optim.AdamW(
            parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
        epoch = batches(grouped, config)

        def step() -> None:
            train_with_bars(model, optimizer, epoch, device, f"sync check: {name}")

        if around is None:
            check_case(figures, name, step, must_be_clean, cuda, len(epoch))
        else:
            with around(model):
                check_case(figures, name, step, must_be_clean, cuda, len(epoch))
        return model

    lora = check_config(device, groups, batch_size=args.batch_size)

    def grouped_model(config: Any) -> Callable[[], PerpeftModel]:
        return lambda: PerpeftModel(config, clip_encoder_factory(config, bundle), inputs, num_items, groups)

    model = case(f"lora, PerPEFT C = {groups}, group-homogeneous batches", lora, grouped_model(lora), True)

    item_group = torch.from_numpy(np.random.default_rng(4).integers(0, groups, size=num_items + 1))
    calls = [0]
    mixed = f"lora, PerPEFT C = {groups}, mixed-group batches"
    case(mixed, lora, lambda: model, True, around=lambda m: mixed_groups(m, item_group, calls))
    if not calls[0]:
        figures.fail(f"{mixed}: training_loss no longer calls item_vectors; the batches were not mixed")

    ia3 = check_config(device, groups, batch_size=args.batch_size, peft="ia3")
    case(f"ia3, PerPEFT C = {groups}, group-homogeneous batches", ia3, grouped_model(ia3), True)
    release(device)

    iisan = check_config(device, groups, batch_size=args.batch_size, peft="iisan")
    states = random_hidden_states(bundle, num_items)
    factory = iisan_encoder_factory(states)
    iisan_model = lambda: PerpeftModel(iisan, factory, states, num_items, groups)  # noqa: E731
    case(f"iisan, PerPEFT C = {groups}, group-homogeneous batches", iisan, iisan_model, True)
    release(device)

    frozen = check_config(device, groups, batch_size=args.batch_size, method="frozen-mm")
    make_frozen, item_ids = encode_frozen(frozen, bundle, inputs, device, False)
    case("frozen-mm (one group)", frozen, lambda: PerpeftModel(frozen, make_frozen, item_ids, num_items, 1), False)
    release(device)

    wo_mm = check_config(device, groups, batch_size=args.batch_size, method="wo-mm")
    case("wo-mm (ID embeddings only)", wo_mm, lambda: PerpeftModel(wo_mm, None, None, num_items, 1), False)
    release(device)

    # Reported, not failed: the text tower reads a padding mask on the host; the embed path.
    masked = not_right_padded(inputs)

    @contextmanager
    def with_mask(m: PerpeftModel) -> Iterator[None]:
        m.inputs = masked
        try:
            yield
        finally:
            m.inputs = inputs

    case("lora, with a text padding mask", lora, lambda: model, True, must_be_clean=False, around=with_mask)

    def embed_batch() -> None:
        items = torch.arange(1, 129)
        with torch.no_grad():
            model.eval()
            model.group_vectors(items)
            model.train()

    check_case(figures, "engine group_vectors (one embed batch, every group)", embed_batch, False, cuda, None)
    return figures.finish()


if __name__ == "__main__":
    raise SystemExit(main())
