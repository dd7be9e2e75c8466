"""Side by side on RecBole's MovieLens-100k: RecBole 1.2.1's SASRec (`recbole_sasrec.py`, in its own virtual
environment) and the engine's item-ID SASRec (``perpeft-engine train --method wo-mm``), one after the other
on the same files and the same protocol (chronological leave-one-out, full ranking with the history
excluded, HR/NDCG at 10/20/30, best epoch by validation HR@30), one thread each.

    python benchmarks/peers/ml100k_parity.py --data ML100K_DIR --work /tmp/parity --out /tmp/parity.json

``ML100K_DIR`` is ``recbole/dataset_example/ml-100k`` of the recbole wheel (see the manual's "Your data",
docs/data.md); ``--recbole-python`` is the interpreter of the environment `recbole_sasrec.py` documents
(default ``/work/peers/recbole-venv/bin/python``; ``--skip-recbole FILE`` reuses a result JSON it wrote).
Prints, and writes to ``--out``, both sides' test metrics and wall seconds, the engine's mean over
``--seeds``, and the two ratios the parity goal is stated in: engine mean NDCG@10 / RecBole's, and
engine mean wall / RecBole's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METRICS = ("HR@10", "HR@20", "HR@30", "NDCG@10", "NDCG@20", "NDCG@30")


def one_thread() -> dict[str, str]:
    """The environment of a one-thread child process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_recbole(python: str, data: Path, work: Path, seed: int) -> dict[str, Any]:
    """RecBole's SASRec under `recbole_sasrec.py`'s protocol; its result JSON (with ``wall_seconds``)."""
    out = work / f"recbole-seed-{seed}.json"
    command = [python, str(HERE / "recbole_sasrec.py"), "--data-dir", str(data), "--seed", str(seed)]
    command += ["--threads", "1", "--work", str(work / "recbole-scratch"), "--out", str(out)]
    subprocess.run(command, check=True, env=one_thread(), stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_engine(data: Path, work: Path, seed: int, options: list[str]) -> dict[str, Any]:
    """``perpeft-engine train --method wo-mm`` for one seed: its test metrics at the selected epoch and the
    command's wall seconds (interpreter start included)."""
    out = work / f"engine-seed-{seed}"
    command = [sys.executable, "-m", "perpeft.cli", "--threads", "1", "train", "--data", str(data)]
    command += ["--method", "wo-mm", "--seed", str(seed), "--out", str(out), "--overwrite", "--quiet", *options]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=one_thread(), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())["global"]
    return {"seed": seed, "wall_seconds": wall, "best_epoch": metrics["best_epoch"], "test": metrics["test"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the ml-100k directory of the recbole wheel")
    parser.add_argument("--work", type=Path, required=True, help="run directories and RecBole's scratch files")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--recbole-python", default="/work/peers/recbole-venv/bin/python")
    parser.add_argument("--skip-recbole", type=Path, default=None, help="a result JSON of an earlier RecBole run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--engine-options",
        default="--train-windows all --batch-size 128 --lr 4e-3 --epochs-global 30 --epochs-perpeft 20",
        help="the engine's training options (one string; the default is the schedule RESULTS.md reports)",
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.skip_recbole:
        recbole = json.loads(args.skip_recbole.read_text())
    else:
        recbole = run_recbole(args.recbole_python, args.data, args.work, 0)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    engine = [run_engine(args.data, args.work, seed, args.engine_options.split()) for seed in seeds]
    mean = {name: statistics.mean(run["test"][name] for run in engine) for name in METRICS}
    wall = statistics.mean(run["wall_seconds"] for run in engine)
    result = {
        "recbole": {
            "test": recbole["test"],
            "wall_seconds": recbole["wall_seconds"],
            "best_epoch": recbole["best_epoch"],
        },
        "engine": {"options": args.engine_options, "runs": engine, "mean_test": mean, "mean_wall_seconds": wall},
        "ndcg10_ratio": mean["NDCG@10"] / recbole["test"]["NDCG@10"],
        "wall_ratio": wall / recbole["wall_seconds"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
