"""`perpeft-engine train` end to end through the CLI: the NCCL run (2 ranks, or 1), or a torch.compile run.

``--nproc N`` (N >= 1) relaunches the command under ``torchrun --standalone --nproc-per-node N``: with a
CUDA device each rank joins an NCCL process group and trains under DistributedDataParallel.
``NCCL_DEBUG=VERSION`` makes NCCL print its version when a communicator starts: that line is the check that
NCCL really ran. With one rank every collective of the engine returns early (world size 1), so only
``--nproc 2`` (two GPUs) exercises them; a one-rank run says so in its figures. ``--nproc 0`` runs one
plain process (for the ``--compile on`` run: SASRec compiled on CUDA).

The data is the built-in demo (tiny CLIP; ``--data``/``--clip`` choose others) with E1 = E2 = 1 and no
baseline: a correctness run with timings, not a speed benchmark.

Nothing waits for the run to end before it is recorded: the run's output streams to this step's log line
by line; the NCCL version is recorded when its line appears; each epoch's train seconds, peak memory and
test NDCG@20 are recorded as soon as the run's ``state.json`` holds that epoch; the figures file is saved
after each. On its time limit's SIGTERM this step records how long the run had been going and the last
lines it printed, and every Python process of the run prints its threads' stacks (a ``sitecustomize``
put first on the run's ``PYTHONPATH``), so a hang in NCCL or in a compile shows where it was.

Run: ``python -m benchmarks.gpu.cli_check --nproc 1 --work DIR --out nccl.json`` (CUDA) or ``--smoke``
(CPU: gloo instead of NCCL).
"""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .figures import Figures, step_arguments

NCCL_VERSION = re.compile(r"NCCL version (\S+)")
POLL_S = 0.5
TAIL_LINES = 30
# Put first on the run's PYTHONPATH: every Python process of the run (the CLI, torchrun, its workers) then
# prints all its threads' stacks on SIGTERM before terminating. A sitecustomize it shadows still runs.
SITECUSTOMIZE = '''"""Written by benchmarks/gpu/cli_check.py: print every thread's stack on SIGTERM, then terminate."""
import faulthandler
import signal
import sys

faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)


def _run_shadowed():
    import importlib.machinery
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_run_shadowed()
'''


class Terminated(Exception):
    """SIGTERM (the step's ``timeout``) or SIGINT arrived while the run was going."""


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


def epochs_so_far(run: Path) -> dict[str, list[dict[str, Any]]]:
    """Each stage's epoch records in the run's ``state.json`` as it is now ({} while there is none, or while
    it cannot be read)."""
    try:
        state = json.loads((run / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict):
        return {}
    return {
        name: list(stage["history"])
        for name, stage in state.items()
        if isinstance(stage, dict) and isinstance(stage.get("history"), list)
    }


def run_device(smoke: bool) -> Any:
    """The CPU for a smoke run, else CUDA (SystemExit without it); torch only, not the engine: this step's
    own work is the run's subprocess."""
    import torch

    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (torch.cuda.is_available() is False); use --smoke for a CPU smoke run")
    return torch.device("cuda")


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


class RunWatch:
    """Streams a running command's output (printed line by line, the last lines kept) and records the
    figures of its epochs as they appear."""

    def __init__(self, figures: Figures, run: Path, started: float) -> None:
        self.figures = figures
        self.run = run
        self.started = started
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.nccl: str | None = None
        self.recorded: set[tuple[str, int]] = set()
        self.lock = threading.Lock()

    def read(self, stream: Any) -> None:
        """Print every line of ``stream`` as it comes (the reader thread)."""
        for line in stream:
            print(line, end="" if line.endswith("\n") else "\n", flush=True)
            with self.lock:
                self.tail.append(line.rstrip("\n"))
                if self.nccl is None:
                    self.nccl = nccl_version(line)

    def poll(self) -> None:
        """Record what is new: each finished epoch's figures (from ``state.json``)."""
        for stage, history in epochs_so_far(self.run).items():
            for record in history:
                key = (stage, int(record.get("epoch", len(self.recorded))))
                if key in self.recorded:
                    continue
                self.recorded.add(key)
                at = time.perf_counter() - self.started
                epoch = f"{stage} epoch {key[1]}"
                if record.get("train_seconds") is not None:
                    note = f"recorded {at:.0f} s after the start"
                    self.figures.add(f"{epoch} train seconds", record["train_seconds"], "s", note)
                if record.get("train_peak_bytes") is not None:
                    self.figures.add(f"{epoch} peak memory", record["train_peak_bytes"] / 2**20, "MiB")
                test = record.get("test", {}).get("NDCG@20") if isinstance(record.get("test"), dict) else None
                if test is not None:
                    self.figures.add(f"{epoch} test NDCG@20", test, note="1 epoch, a sanity value")


def write_sitecustomize(work: Path) -> Path:
    """The directory of the stack-dumping ``sitecustomize`` (see SITECUSTOMIZE)."""
    directory = work / "sitecustomize"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return directory


def terminate(process: subprocess.Popen, grace_s: float = 4.0) -> None:
    """SIGTERM ``process`` (it may have had it already), then SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Directory for the run (and nothing else).")
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes; 0: one plain process.")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="off")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--clip", default=None)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument(
        "--name", default=None, help="Step name in the figures (default: nccl-wsN for N ranks, or compile)."
    )
    args = parser.parse_args(argv)
    device = run_device(args.smoke)
    name = args.name or (f"nccl-ws{args.nproc}" if args.nproc else "compile")
    figures = Figures(name, device, args.smoke, args.out)
    run = args.work / "run"
    command = train_command(args, device.type, run)
    path = [str(write_sitecustomize(args.work)), *filter(None, [os.environ.get("PYTHONPATH")])]
    environment = {
        **os.environ,
        "NCCL_DEBUG": "VERSION",
        "PERPEFT_DIST_TIMEOUT": "120",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(path),
    }
    if args.smoke:  # one thread, as the other smoke steps (see check_device)
        environment["OMP_NUM_THREADS"] = "1"
    how = f"{args.nproc} torchrun process(es)" if args.nproc else "one process"
    figures.details.update(command=command, nproc=args.nproc, compile=args.compile, data=args.data)
    if args.nproc == 1:
        figures.details["collectives_exercised"] = False
        figures.add(
            "collectives exercised",
            "no",
            note="world size 1 (one GPU): every collective returns early; only the process group and DDP start",
        )
    elif args.nproc >= 2:
        figures.details["collectives_exercised"] = True
        figures.add("collectives exercised", "yes", note=f"{args.nproc} ranks: gradient all-reduce, gathers")

    def interrupted(signum: int, frame: Any) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    watch = RunWatch(figures, run, started)
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    reader = threading.Thread(target=watch.read, args=(process.stdout,), daemon=True)
    reader.start()
    nccl_recorded = False
    try:
        while process.poll() is None:
            time.sleep(POLL_S)
            watch.poll()
            if watch.nccl and not nccl_recorded:
                nccl_recorded = True
                figures.add("process-group backend", f"NCCL {watch.nccl}", note="from NCCL_DEBUG=VERSION output")
        reader.join(timeout=5)
        watch.poll()
    except Terminated as signal_name:
        # Figures first: SIGKILL follows SIGTERM within seconds (timeout --kill-after).
        seconds = time.perf_counter() - started
        figures.add(f"wall time of train until {signal_name}", seconds, "s", f"{how}, --compile {args.compile}")
        figures.fail(f"stopped by {signal_name} after {seconds:.0f} s (its time limit, or the check was stopped)")
        terminate(process)  # the run's processes print their stacks on SIGTERM: let them, then read the rest
        reader.join(timeout=2)
        with watch.lock:
            figures.details["last_output"] = list(watch.tail)
        figures.save()
        return 124
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    seconds = time.perf_counter() - started
    figures.details["returncode"] = process.returncode
    figures.add(
        "wall time of train (E1 = E2 = 1, no baseline)",
        seconds,
        "s",
        f"{how}, --compile {args.compile}, data {args.data}",
    )
    if process.returncode != 0:
        with watch.lock:
            figures.details["last_output"] = list(watch.tail)
        figures.fail(f"train exited with status {process.returncode}")
        return figures.finish()
    if args.nproc:
        if not nccl_recorded:
            backend = "gloo" if device.type == "cpu" else "NCCL not seen"
            figures.add("process-group backend", backend, note="from NCCL_DEBUG=VERSION output")
        if device.type == "cuda" and watch.nccl is None:
            figures.fail("no 'NCCL version' line: the run did not start an NCCL communicator")
    stages = run_figures(run)  # the run's metrics.json: it finished every stage
    figures.add("stages in metrics.json", ", ".join(stages) or "none")
    figures.details["stages"] = stages
    return figures.finish()


if __name__ == "__main__":
    raise SystemExit(main())
