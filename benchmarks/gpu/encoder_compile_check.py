"""A grouped-encoder training step, eager and under torch.compile: compile time and milliseconds per step.

The engine's `GroupedClipEncoder` (random CLIP of ViT-B/32's widths, LoRA r 4 on q/v in both towers,
C = 8 groups, a mixed-group batch of 64 items, bf16 autocast on CUDA) and AdamW over its adapters: a step
is the encoder's forward, a loss on its output, the backward and the optimizer step, each batch with its own
`RowGroups` as in training. The encoder is compiled whole with inductor and ``fullgraph=True`` (a graph
break fails the step); the fused ops are registered operators, so they stay Triton kernels inside the
compiled graph. Eager steps are timed first, then the first compiled step (trace, compile and run, from a
cold cache: ``gpu_check.sh`` gives the step its own inductor cache), then compiled steps. CLIP keeps
``--layers`` encoder layers per tower (2 by default; ViT-B/32 has 12): compile time grows with depth and
the step's planned limit is short. Every batch has the same title width: another would compile again.

Run: ``python -m benchmarks.gpu.encoder_compile_check --out encoder-compile.json`` (CUDA) or ``--smoke``
(CPU, tiny random CLIP, ``aot_eager``: no code generation, the orchestration only).
"""

import contextlib
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

from perpeft.engine.clip.loading import ClipBundle
from perpeft.engine.clip.model import ClipConfig, ClipModel, TextConfig, VisionConfig
from perpeft.engine.clip.tiny import CLIP_MEAN, CLIP_STD
from perpeft.engine.model.encoders import GroupedClipEncoder
from perpeft.engine.model.groups import RowGroups

from .common import (
    ARTS,
    SMOKE,
    Figures,
    check_device,
    random_clip,
    step_arguments,
    stopwatch,
    synchronize,
    synthetic_inputs,
)

WARMUP_STEPS = 2


def encoder_clip(smoke: bool, layers: int) -> ClipBundle:
    """The smoke CLIP, or a random CLIP of ViT-B/32's widths with ``layers`` encoder layers per tower."""
    if smoke:
        return random_clip(True)
    torch.manual_seed(0)
    config = ClipConfig(TextConfig(num_hidden_layers=layers), VisionConfig(num_hidden_layers=layers))
    name = f"random ViT-B/32 widths, {layers} layers per tower"
    return ClipBundle(ClipModel(config).eval(), None, name, config.vision_config.image_size, CLIP_MEAN, CLIP_STD, name)


def main(argv: list[str] | None = None) -> int:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--items", type=int, default=64, help="Items per step, their groups mixed.")
    parser.add_argument("--layers", type=int, default=2, help="Encoder layers per CLIP tower.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps, eager and compiled, after warm-up.")
    args = parser.parse_args(argv)
    device = check_device(args.smoke)
    figures = Figures("encoder-compile", device, args.smoke, args.out)
    bundle = encoder_clip(args.smoke, args.layers)
    scale = SMOKE if args.smoke else ARTS
    items = torch.arange(1, args.items + 1)
    batch = synthetic_inputs(bundle, args.items, scale.title_chars).batch(items, device)
    item_groups = items % args.groups
    torch.manual_seed(1)
    encoder = GroupedClipEncoder(bundle, "lora", args.groups).to(device).train()
    with torch.no_grad():  # LoRA B starts at zero: randomise the adapters so every gradient is live
        for parameter in encoder.adapter_state().values():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    optimizer = torch.optim.AdamW(list(encoder.adapter_state().values()), lr=1e-4)
    cuda = device.type == "cuda"
    backend = "inductor" if cuda else "aot_eager"
    label = f"{args.items} items, C = {args.groups} mixed, {bundle.source}" + (", bf16" if cuda else "")
    figures.details.update(
        items=args.items,
        groups=args.groups,
        layers=args.layers,
        clip=bundle.source,
        backend=backend,
        autocast_bf16=cuda,
    )

    def step(forward: Callable[..., torch.Tensor]) -> None:
        groups = RowGroups.per_row(item_groups, args.groups, device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            out = forward(*batch, groups)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def milliseconds_per_step(forward: Callable[..., torch.Tensor]) -> float:
        for _ in range(WARMUP_STEPS):
            step(forward)
        synchronize(device)
        with stopwatch() as clock:
            for _ in range(args.steps):
                step(forward)
            synchronize(device)
        return 1000 * clock["seconds"] / args.steps

    timing = f"mean of {args.steps} steps after {WARMUP_STEPS} warm-up steps"
    eager = milliseconds_per_step(encoder)
    figures.add(f"eager training step, {label}", eager, "ms", timing)

    compiled = torch.compile(encoder, backend=backend, fullgraph=True)
    counters.clear()
    try:
        with stopwatch() as first:
            step(compiled)
            synchronize(device)
    except Exception as error:  # a graph break under fullgraph=True, or a compiler error: the step's finding
        figures.fail(f"torch.compile(encoder, fullgraph=True) failed: {type(error).__name__}: {error}")
        return figures.finish()
    figures.add(f"first compiled step (trace, compile, run), {label}", first["seconds"], "s", f"{backend}, fullgraph")
    steady = milliseconds_per_step(compiled)
    figures.add(f"compiled training step, {label}", steady, "ms", f"{timing}; {eager / steady:.2f}x eager")
    graphs = counters["stats"]["unique_graphs"]
    figures.add("graphs compiled for the encoder", graphs, "", "1: captured whole, never recompiled")
    if graphs != 1:
        figures.fail(f"{graphs} graphs compiled: a recompile or a graph break")
    return figures.finish()


if __name__ == "__main__":
    raise SystemExit(main())
