"""Arts scale on one CPU machine: a Global epoch, a PerPEFT epoch, an evaluation and ``embed``.

A synthetic shop of the paper's Arts size (`benchmarks.shops.ARTS_SCALE`: 24,511 users, 18,884 items,
~9.4 purchases per user, Amazon-like titles of 40–150 characters, 224-px JPEGs) with the shipped tiny
CLIP (the input cache stores its 32-px crops). For 1/4, 1/2 and all of the users (the same catalog,
so one input cache) ``perpeft-engine train`` runs E1 = E2 = 1 with ``--no-baseline`` (C = 8, paper
settings otherwise) and ``perpeft-engine embed`` follows, each in its own process:

- Global / PerPEFT epoch: ``train_seconds`` and ``train_peak_bytes`` (peak RSS) of the stage's epoch;
- evaluation: the rest of that epoch's ``seconds`` (full ranking of valid and test over all items,
  C item tables for PerPEFT);
- grouping: the process wall minus the epochs, which also holds start-up and loading;
- ``embed``: the command's wall and peak RSS (every group's table, every user's vector, files written).

The input cache is built before the first case and is not timed. Run on an idle machine:
``pytest benchmarks/test_arts_scale_bench.py --benchmark-enable -s`` (about 15 minutes on 2 cores,
plus about 5 for writing the shop and its cache once).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.shops import ARTS_SCALE, bench_root, user_subset, write_shop
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.model.run_inputs import load_run_inputs

FRACTIONS = {"1/4": 4, "1/2": 2, "all": 1}


@pytest.fixture(scope="module")
def arts() -> Path:
    dataset = write_shop(bench_root() / "arts-scale", ARTS_SCALE)
    config = RunConfig(data=str(dataset), clip="tiny", device="cpu").resolved()
    load_run_inputs(config, run_dataset(config), progress=True)
    return dataset


def timed_command(arguments: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``perpeft-engine ARGUMENTS`` in a fresh process."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "perpeft.cli", *arguments], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    return wall, usage.ru_maxrss * 1024


@pytest.mark.parametrize("fraction", list(FRACTIONS))
def test_arts_scale(benchmark, arts: Path, tmp_path: Path, fraction: str) -> None:
    users = ARTS_SCALE.users // FRACTIONS[fraction]
    data = user_subset(arts, users, bench_root() / "arts-scale" / f"arts-{users}u")
    run = tmp_path / "run"
    train = ["train", "--data", str(data), "--clip", "tiny", "--peft", "lora", "--groups", "8", "--device", "cpu"]
    train += ["--epochs-global", "1", "--epochs-perpeft", "1", "--no-baseline", "--quiet", "--out", str(run)]

    def both() -> dict[str, float]:
        train_wall, train_peak = timed_command(train)
        embed_wall, embed_peak = timed_command(["embed", "--run", str(run), "--quiet"])
        return {"train_wall": train_wall, "train_peak": train_peak, "embed_wall": embed_wall, "embed_peak": embed_peak}

    walls = benchmark.pedantic(both, rounds=1, iterations=1)
    state = json.loads((run / "state.json").read_text())
    row = {"users": users, **walls}
    for stage in ("global", "perpeft"):
        epoch = state[stage]["history"][0]
        row[f"{stage}_epoch_s"] = epoch["train_seconds"]
        row[f"{stage}_epoch_peak"] = epoch["train_peak_bytes"]
        row[f"{stage}_eval_s"] = epoch["seconds"] - epoch["train_seconds"]
    row["other_s"] = walls["train_wall"] - sum(state[stage]["history"][0]["seconds"] for stage in ("global", "perpeft"))
    benchmark.extra_info.update(row)
    per_user = {key: row[key] / users * 1e3 for key in ("global_epoch_s", "perpeft_epoch_s", "embed_wall")}
    print(f"\n{fraction} ({users} users): {json.dumps(row)}\n  ms per user: {json.dumps(per_user)}")
