"""The service over time: `perpeft-engine serve` on a copy of RUN (a finished, embedded PerPEFT run) under
steady load for minutes, with catalog updates published while it runs.

``--clients`` concurrent clients (one keep-alive connection each) send POST /recommend in a closed loop,
known users and new users' histories alternately (bodies as in `serve_load.py`). Every ``--update-every``
seconds a separate process adds ``--items-per-update`` items (`perpeft-engine embed --add-items`, copies of
trained items under new ids), which the service takes in within its reload interval. Per window of
``--window`` seconds the report gives the answers (200, 4xx, 5xx), p50 / p99 latency, the server's resident
memory (VmRSS, sampled every second) and the catalog version it served; then three verdicts:

- memory flat: the last window's RSS within ``--rss-slack-mib`` of the second window's (after warm-up),
  although every update grew the catalog (a few kB of table rows each);
- no 5xx answer in any window;
- p99 steady: no window's p99 above twice the median window p99.

    python benchmarks/serve_soak.py --run RUN --minutes 5 --clients 4 --out soak.json
"""

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.catalog_update import write_item_copies
from benchmarks.serve_load import free_port, request_makers, start_server
from perpeft.engine.data.sources import run_dataset
from perpeft.engine.runtime.run_directory import RunDirectory


def resident_mib(pid: int) -> float:
    """A process's resident memory (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"pid {pid}: no VmRSS")


def publish_updates(run: Path, scratch: Path, every: float, items: int, stop: threading.Event, log: list) -> None:
    """Every ``every`` seconds until ``stop``: ``items`` new items added by `embed --add-items` in a process
    of its own; each update's time, duration and exit status appended to ``log``."""
    trained = run_dataset(RunDirectory.open(run).config).num_items
    update = 0
    while not stop.wait(every):
        update += 1
        rows = [1 + (update * items + offset) % trained for offset in range(items)]
        item_file, _ = write_item_copies(run, scratch / f"update-{update}", rows, f"soak{update}x")
        started = time.perf_counter()
        command = [sys.executable, "-m", "perpeft.cli", "embed", "--run", str(run), "--add-items", str(item_file)]
        done = subprocess.run([*command, "--quiet"], capture_output=True, text=True, check=False)
        log.append(
            {
                "update": update,
                "at": time.monotonic(),
                "seconds": time.perf_counter() - started,
                "exit_status": done.returncode,
                "stderr": done.stderr.strip()[-300:],
            }
        )


async def soak(base: str, run: Path, pid: int, seconds: float, clients: int, window: float) -> list[dict[str, Any]]:
    """Closed-loop load for ``seconds``; every answer and every RSS sample, grouped in windows."""
    makers = list(request_makers(run).values())
    answers: list[tuple[float, float, int]] = []  # (monotonic time sent, latency s, status)
    memory: list[tuple[float, float]] = []
    versions: list[tuple[float, int]] = []
    start = time.monotonic()
    deadline = start + seconds

    async def client(session: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        turn = seed
        while time.monotonic() < deadline:
            body = makers[turn % len(makers)](rng)
            turn += 1
            sent = time.monotonic()
            try:
                response = await session.post("/recommend", json=body)
                status = response.status_code
            except httpx.HTTPError:
                status = 599  # no answer at all: counted with the 5xx
            answers.append((sent, time.monotonic() - sent, status))

    async def sampler(session: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            memory.append((time.monotonic(), resident_mib(pid)))
            ready = await session.get("/ready")
            versions.append((time.monotonic(), ready.json().get("catalog_version", -1)))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as session:
        await asyncio.gather(sampler(session), *(client(session, seed) for seed in range(clients)))
    windows = []
    for index in range(int(seconds // window)):
        low, high = start + index * window, start + (index + 1) * window
        cell = [answer for answer in answers if low <= answer[0] < high]
        latencies = sorted(latency for _, latency, _ in cell)
        rss = [mib for at, mib in memory if low <= at < high]
        served = [version for at, version in versions if low <= at < high]
        windows.append(
            {
                "window": index,
                "requests": len(cell),
                "ok": sum(status == 200 for _, _, status in cell),
                "4xx": sum(400 <= status < 500 for _, _, status in cell),
                "5xx": sum(status >= 500 for _, _, status in cell),
                "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
                "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
                "rss_mib": max(rss) if rss else None,
                "catalog_version": max(served) if served else None,
            }
        )
    return windows


def verdicts(windows: list[dict[str, Any]], rss_slack_mib: float) -> dict[str, Any]:
    p99 = [window["p99_ms"] for window in windows if window["p99_ms"] is not None]
    median = statistics.median(p99)
    growth = windows[-1]["rss_mib"] - windows[1]["rss_mib"]
    return {
        "rss_growth_after_warmup_mib": growth,
        "memory_flat": growth <= rss_slack_mib,
        "five_xx": sum(window["5xx"] for window in windows),
        "no_5xx": all(window["5xx"] == 0 for window in windows),
        "p99_median_ms": median,
        "p99_max_ms": max(p99),
        "p99_steady": max(p99) <= 2 * median,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--window", type=float, default=15.0, help="seconds per reported window")
    parser.add_argument("--update-every", type=float, default=60.0, help="seconds between catalog updates")
    parser.add_argument("--items-per-update", type=int, default=20)
    parser.add_argument("--rss-slack-mib", type=float, default=16.0)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "run"
        shutil.copytree(args.run, copy, ignore=shutil.ignore_patterns("additions", "catalog.json", "hnsw", ".lock"))
        port = free_port()
        server = start_server(copy, port, args.server_threads)
        stop, published = threading.Event(), []
        updater = threading.Thread(
            target=publish_updates,
            args=(copy, Path(scratch), args.update_every, args.items_per_update, stop, published),
            daemon=True,
        )
        try:
            updater.start()
            started = time.monotonic()
            windows = asyncio.run(
                soak(f"http://127.0.0.1:{port}", copy, server.pid, 60 * args.minutes, args.clients, args.window)
            )
            stop.set()
            updater.join()
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "run": str(args.run),
        "minutes": args.minutes,
        "clients": args.clients,
        "window_s": args.window,
        "updates": [
            {"at_s": entry["at"] - started, **{key: value for key, value in entry.items() if key != "at"}}
            for entry in published
        ],
        "windows": windows,
        "verdicts": verdicts(windows, args.rss_slack_mib),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    passed = all(result["verdicts"][name] for name in ("memory_flat", "no_5xx", "p99_steady"))
    return 0 if passed and all(entry["exit_status"] == 0 for entry in published) else 1


if __name__ == "__main__":
    sys.exit(main())
