"""`perpeft-engine train` end to end through the CLI: the world-size-1 NCCL run, or a torch.compile run.

``--nproc 1`` relaunches the command under ``torchrun --standalone --nproc-per-node 1``: with a CUDA
device the rank joins an NCCL process group and trains under DistributedDataParallel (its parameter
broadcast and every step's gradient all-reduce go through NCCL even with one rank). ``NCCL_DEBUG=VERSION``
makes NCCL print its version when a communicator starts: that line is the check that NCCL really ran.
``--nproc 0`` runs one plain process (for the ``--compile auto`` run: SASRec compiled on CUDA).

The data is the built-in demo (tiny CLIP; ``--data``/``--clip`` choose others) with E1 = E2 = 1 and no
baseline: a correctness run with timings, not a speed benchmark.

Run: ``python -m benchmarks.gpu.cli_check --nproc 1 --work DIR --out nccl.json`` (CUDA) or ``--smoke``
(CPU: gloo instead of NCCL).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import Figures, check_device, step_arguments

NCCL_VERSION = re.compile(r"NCCL version (\S+)")


def nccl_version(output: str) -> str | None:
    """The version NCCL printed under ``NCCL_DEBUG=VERSION``, or None when no NCCL communicator started."""
    match = NCCL_VERSION.search(output)
    return match.group(1) if match else None


def run_figures(run: Path) -> dict[str, Any]:
    """Per-stage train seconds, peak bytes and best test NDCG@20 from a finished run's state and metrics."""
    state = json.loads((run / "state.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    stages = {}
    for name in ("global", "perpeft", "grouped"):
        if name in metrics:
            history = state[name]["history"]
            stages[name] = {
                "train_seconds": [epoch["train_seconds"] for epoch in history],
                "train_peak_bytes": [epoch["train_peak_bytes"] for epoch in history],
                "test_ndcg20": metrics[name]["test"]["NDCG@20"],
            }
    return stages


def train_command(args: Any, device: str, run: Path) -> list[str]:
    """The ``perpeft-engine train`` command line of this check."""
    command = [sys.executable, "-m", "perpeft.cli", "train", "--data", args.data, "--groups", str(args.groups)]
    command += ["--epochs-global", "1", "--epochs-perpeft", "1", "--no-baseline", "--device", device]
    command += ["--compile", args.compile, "--out", str(run), "--overwrite", "--quiet"]
    if args.clip:
        command += ["--clip", args.clip]
    if args.nproc:
        command += ["--nproc", str(args.nproc)]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Directory for the run (and nothing else).")
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes; 0: one plain process.")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="off")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--clip", default=None)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--name", default=None, help="Step name in the figures (default: nccl-ws1 or compile).")
    args = parser.parse_args(argv)
    device = check_device(args.smoke)
    name = args.name or ("nccl-ws1" if args.nproc else "compile")
    figures = Figures(name, device, args.smoke, args.out)
    run = args.work / "run"
    command = train_command(args, device.type, run)
    environment = {**os.environ, "NCCL_DEBUG": "VERSION", "PERPEFT_DIST_TIMEOUT": "120"}
    if args.smoke:  # one thread, as the other smoke steps (see check_device)
        environment["OMP_NUM_THREADS"] = "1"
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    output = finished.stdout + finished.stderr
    print(output, flush=True)
    figures.details.update(command=command, returncode=finished.returncode)
    how = f"{args.nproc} torchrun process(es)" if args.nproc else "one process"
    figures.add(
        "wall time of train (E1 = E2 = 1, no baseline)",
        seconds,
        "s",
        f"{how}, --compile {args.compile}, data {args.data}",
    )
    if finished.returncode != 0:
        figures.fail(f"train exited with status {finished.returncode}")
        return figures.finish()
    if args.nproc:
        version = nccl_version(output)
        backend = f"NCCL {version}" if version else ("gloo" if device.type == "cpu" else "NCCL not seen")
        figures.add("process-group backend", backend, note="from NCCL_DEBUG=VERSION output")
        if device.type == "cuda" and version is None:
            figures.fail("no 'NCCL version' line: the run did not start an NCCL communicator")
    for stage, values in run_figures(run).items():
        figures.add(f"{stage} epoch train seconds", values["train_seconds"][-1], "s")
        figures.add(f"{stage} epoch peak memory", values["train_peak_bytes"][-1] / 2**20, "MiB")
        figures.add(f"{stage} test NDCG@20", values["test_ndcg20"], note="1 epoch, a sanity value")
    return figures.finish()


if __name__ == "__main__":
    raise SystemExit(main())
