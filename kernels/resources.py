"""What each kernel costs an SM: compiled for sm_80 and sm_90 without a GPU, read back with cuobjdump.

The launches are the ones the ops issue for ViT-B/32 shapes (:func:`vit_b32_launches`): every op
runs forward and backward on CPU tensors under :func:`~perpeft.kernels._triton.recorded_launches`, so
the grid, constexprs and warps are the engine's own and no kernel runs. Each launch is bound the way
Triton's launcher binds it (pointer dtypes and alignment, integers equal to 1 or divisible by 16 are
specialised), launches that bind alike share one binary, and each binary is compiled by
``triton.compile`` for the target. Registers, stack and local memory per thread and static shared
memory come from ``cuobjdump --dump-resource-usage`` of the cubin (shipped in the Triton wheel),
dynamic shared memory from the kernel's metadata.

Compiling needs Triton in compiled mode, which a CPU-only process gets with ``TRITON_INTERPRET=0``:
``TRITON_INTERPRET=0 python -m perpeft.kernels.resources sm_90`` prints one JSON object per binary;
:func:`measure` runs that in a subprocess per target, so it works from a process that interprets.
"""

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from ._triton import KernelLaunch, recorded_launches, triton
from .ops import bce_with_negatives, grouped_ia3, grouped_lora
from .segments import segment_groups


@dataclass(frozen=True)
class Target:
    """A GPU the kernels are compiled for, with the per-SM limits that bound occupancy."""

    name: str
    gpu: str
    capability: int
    sms: int
    shared_per_sm: int
    """Bytes of shared memory an SM can give its blocks (the largest carveout)."""
    registers_per_sm: int = 65536
    warps_per_sm: int = 64
    blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024
    """Shared memory CUDA reserves for every resident block on sm_80 and later."""

    @property
    def programs(self) -> int:
        """What :func:`~perpeft.kernels._triton.target_programs` returns on this GPU: 4 per SM."""
        return 4 * self.sms


TARGETS = {
    "sm_80": Target("sm_80", "A100", 80, sms=108, shared_per_sm=164 * 1024),
    "sm_90": Target("sm_90", "H100 SXM", 90, sms=132, shared_per_sm=228 * 1024),
}

_REGISTER_UNIT = 256  # registers are allocated per warp in units of 256 (per thread: multiples of 8)
_SUB_PARTITIONS = 4  # an SM's register file is four equal banks, one per warp scheduler


def blocks_per_sm(target: Target, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident blocks per SM, the least of four limits (as CUDA's occupancy calculator computes them).

    - warps: ``warps_per_sm // num_warps``;
    - blocks: ``blocks_per_sm``;
    - registers: a warp takes ``ceil(32 * registers / 256) * 256`` registers from one of the SM's four
      banks of ``registers_per_sm / 4``, and a block spreads its warps over the banks, so
      ``(bank // per_warp) // ceil(num_warps / 4)`` blocks fit;
    - shared memory: ``shared_per_sm // (shared_bytes + reserved_shared_per_block)``.

    Occupancy is ``blocks * num_warps / warps_per_sm``.
    """
    per_warp = math.ceil(32 * registers / _REGISTER_UNIT) * _REGISTER_UNIT
    bank = target.registers_per_sm // _SUB_PARTITIONS
    by_registers = (bank // per_warp) // math.ceil(num_warps / _SUB_PARTITIONS)
    by_shared = target.shared_per_sm // (shared_bytes + target.reserved_shared_per_block)
    return min(target.warps_per_sm // num_warps, target.blocks_per_sm, by_registers, by_shared)


@dataclass(frozen=True)
class Binary:
    """One compiled kernel binary, its resource use and the recorded launches that run it."""

    kernel: str
    config: str
    """Input dtype, the kernel's constexprs and its warps/stages: what a table row groups by."""
    target: str
    num_warps: int
    registers: int
    """Per thread."""
    stack_bytes: int
    local_bytes: int
    """Per thread; with ``stack_bytes``, nonzero only when registers spill."""
    shared_bytes: int
    """Per block: static plus dynamic. On sm_90 every kernel that uses shared memory reports 1 KB of
    static shared memory more than on sm_80 (its cubin references ``__nv_reservedSMEM``); if that is
    CUDA's per-block reservation, :func:`blocks_per_sm` counts it twice (conservative)."""
    cases: tuple[str, ...]

    @property
    def blocks_per_sm(self) -> int:
        return blocks_per_sm(TARGETS[self.target], self.registers, self.shared_bytes, self.num_warps)

    @property
    def warps_per_sm(self) -> int:
        return self.blocks_per_sm * self.num_warps

    @property
    def occupancy(self) -> float:
        return self.warps_per_sm / TARGETS[self.target].warps_per_sm


# ViT-B/32 as the engine adapts it: (width, MLP width, tokens per item) per tower.
TOWERS = {"text": (512, 2048, 77), "vision": (768, 3072, 50)}
ITEMS = 64
"""Items per encoder batch (3,200 vision, 4,928 text rows): 64-row tiles at every group count here."""
GROUPS = (1, 8, 16)
RANKS = (4, 16)
DTYPES = (torch.float32, torch.bfloat16)
BCE_ROWS = 160
"""SASRec rows of one training batch at the defaults: 16 users × 10 positions."""
BCE_WIDTHS = (32, 64, 512)


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


@dataclass(frozen=True)
class _Case:
    """One op call: its label in the table, its input dtype, and the call."""

    label: str
    dtype: torch.dtype
    op: Callable[[], torch.Tensor]


def _cases() -> Iterator[_Case]:
    """Every op call the table covers; each runs forward, and backward into the inputs that need grads."""
    for (tower, (width, mlp, tokens)), groups, dtype in itertools.product(TOWERS.items(), GROUPS, DTYPES):
        item_groups = torch.arange(ITEMS) % groups
        row_groups, segments = item_groups.repeat_interleave(tokens), segment_groups(item_groups, groups)
        rows = ITEMS * tokens
        for grad_x in (True, False):
            suffix = f"C={groups} {_name(dtype)}" + (" dx" if grad_x else "")
            # LoRA on q/v (K = M = width) and on fc1/fc2 shapes (width <-> MLP width).
            for (k, m), rank in itertools.product(((width, width), (width, mlp), (mlp, width)), RANKS):
                x = torch.empty(rows, k, dtype=dtype, requires_grad=grad_x)
                a = torch.empty(groups, rank, k, dtype=dtype, requires_grad=True)
                b = torch.empty(groups, m, rank, dtype=dtype, requires_grad=True)
                op = functools.partial(grouped_lora, x, a, b, row_groups, 2.0, segments=segments)
                yield _Case(f"lora {tower} K={k} M={m} r={rank} {suffix}", dtype, op)
            # (IA)3 on k/v outputs and fc1 inputs (width), and on an MLP-wide input.
            for k in (width, mlp):
                x = torch.empty(rows, k, dtype=dtype, requires_grad=grad_x)
                scales = torch.empty(groups, k, dtype=dtype, requires_grad=True)
                op = functools.partial(grouped_ia3, x, scales, row_groups, segments=segments)
                yield _Case(f"ia3 {tower} K={k} {suffix}", dtype, op)
    for width, dtype in itertools.product(BCE_WIDTHS, DTYPES):
        h, pos, neg = (torch.empty(BCE_ROWS, width, dtype=dtype, requires_grad=True) for _ in range(3))
        op = functools.partial(bce_with_negatives, h, pos, neg, torch.ones(BCE_ROWS, dtype=torch.bool))
        yield _Case(f"bce D={width} {_name(dtype)}", dtype, op)


def vit_b32_launches(programs: int) -> list[tuple[_Case, KernelLaunch]]:
    """The launches of every case, forward and backward, as a GPU wanting ``programs`` programs sizes them
    (the ops take their Triton path when ``PERPEFT_KERNELS=triton``, as :func:`main` sets it)."""
    launches = []
    for case in _cases():
        with recorded_launches(programs) as recorded:
            out = case.op()
            if out.requires_grad:
                out.backward(torch.empty_like(out))
        launches += [(case, launch) for launch in recorded]
    return launches


@dataclass
class _Build:
    """One binary to compile: what the launcher would compile, and the launches that share it."""

    kernel: JITFunction
    config: str
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], object]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, object]
    cases: list[str]


# The compilation knobs `JITFunction.run` passes to every launch, those this Triton has (3.9 added the last).
_RUN_KNOBS = {
    name: getattr(knobs.compilation, name)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts")
    if hasattr(knobs.compilation, name)
}


def _builds(target: Target) -> list[_Build]:
    """The distinct binaries of :func:`vit_b32_launches` on ``target``, each with the cases that run it.

    Binds every launch as ``JITFunction.run`` does (Triton 3.8 and 3.9) before compiling: the same options and
    specialisation, so launches that would hit one cached binary at run time are compiled once here.
    """
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    binders: dict[JITFunction, Callable] = {}
    builds: dict[str, _Build] = {}
    for case, launch in vit_b32_launches(target.programs):
        kernel = launch.kernel
        if kernel not in binders:
            binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = {"debug": kernel.debug or knobs.runtime.debug, **_RUN_KNOBS, **launch.options}
        bound, specialization, options = binders[kernel](*launch.args, **kwargs)
        key = repr((kernel.fn.__qualname__, specialization, options))
        if key not in builds:
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            declared = ", ".join(f"{p.name}={launch.options[p.name]}" for p in kernel.params if p.is_constexpr)
            config = f"{_name(case.dtype)}; {declared}; {options.num_warps} warps, {options.num_stages} stages"
            builds[key] = _Build(kernel, config, signature, constexprs, attrs, options.__dict__, [])
        builds[key].cases.append(case.label)
    return list(builds.values())


_RESOURCE_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _compile(build: _Build, target: Target) -> Binary:
    source = ASTSource(build.kernel, build.signature, build.constexprs, build.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", target.capability, 32), options=build.options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        command = [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)]
        usage = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = _RESOURCE_USAGE.search(usage)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{usage}")
    registers, stack, static_shared, local = map(int, match.groups())
    return Binary(
        kernel=build.kernel.fn.__name__,
        config=build.config,
        target=target.name,
        num_warps=compiled.metadata.num_warps,
        registers=registers,
        stack_bytes=stack,
        local_bytes=local,
        shared_bytes=static_shared + compiled.metadata.shared,
        cases=tuple(build.cases),
    )


def measure(targets: Iterable[str] = tuple(TARGETS)) -> list[Binary]:
    """Every binary of :func:`vit_b32_launches` compiled for each target, one subprocess per target
    (run in parallel) with ``TRITON_INTERPRET=0``, whatever mode this process's Triton is in."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    binaries = []
    with contextlib.ExitStack() as files:
        runs = []
        for name in targets:
            # Output to files, not pipes: a full pipe would stall a run until the runs before it end.
            out, err = (files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            command = [sys.executable, "-m", __name__, name]
            runs.append((command, subprocess.Popen(command, env=env, stdout=out, stderr=err), out, err))
        for command, run, out, err in runs:
            run.wait()
            out.seek(0)
            err.seek(0)
            if run.returncode:
                raise RuntimeError(f"{' '.join(command)} failed:\n{err.read()}")
            binaries += [Binary(**{**row, "cases": tuple(row["cases"])}) for row in map(json.loads, out)]
    return binaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=TARGETS)
    target = TARGETS[parser.parse_args(argv).target]
    if knobs.runtime.interpret:
        sys.exit("Triton interprets here: run with TRITON_INTERPRET=0")
    os.environ["PERPEFT_KERNELS"] = "triton"  # CPU tensors stand in for CUDA ones: the kernels' path, recorded
    for build in _builds(target):
        print(json.dumps(asdict(_compile(build, target))), flush=True)


if __name__ == "__main__":
    main()
