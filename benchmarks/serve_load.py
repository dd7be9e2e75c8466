"""A bounded load test of `perpeft-engine serve` on 127.0.0.1: latency and throughput by client count.

Starts the service on RUN in its own process, waits for ``/ready``, then for each request kind (a known
user, a new user's history) and each number of concurrent clients sends a fixed number of requests from
an asyncio HTTP client (one keep-alive connection per client), stopping early at ``--max-seconds``:

    python benchmarks/serve_load.py --run RUN --clients 1,8,32 --requests 2000 --out load.json
    python benchmarks/serve_load.py --run RUN --client wrk --max-seconds 10 --out load.json

With ``--client wrk`` (Debian's ``wrk``: one C thread, a Lua script cycling through 5,000 seeded bodies)
each cell runs for ``--max-seconds`` instead. Each cell reports p50 / p99 / mean latency (client side, send to last byte), throughput (answered
requests per second of the cell's wall), and the count of non-200 answers. Known users are drawn
uniformly from the run's users; a new user's history is 1–10 items of a random known user's purchases
(seeded), with ``k`` = 10. The server gets ``--server-threads`` torch threads (default 1: one core
computes, the other runs the client).
"""

import argparse
import asyncio
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from perpeft.engine.data.sources import run_dataset
from perpeft.engine.runtime.run_directory import RunDirectory

Body = dict[str, Any]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, port: int, threads: int, workers: int = 1) -> subprocess.Popen:
    """`perpeft-engine serve` on 127.0.0.1:``port``, returned once ``/ready`` answers."""
    command = [sys.executable, "-m", "perpeft.cli", "--threads", str(threads), "serve", "--run", str(run)]
    command += ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the service exited: {server.stderr.read() if server.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                return server
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("the service did not become ready in 300 s") from None
            time.sleep(0.25)


def request_makers(run: Path) -> dict[str, Callable[[random.Random], Body]]:
    """Body factories per request kind, from the run's own users and their purchases."""
    dataset = run_dataset(RunDirectory.open(run).config)
    users = [user for user in dataset.user_ids if user is not None]
    sequences = [sequence for sequence in dataset.sequences if len(sequence)]

    def known(rng: random.Random) -> Body:
        return {"user": rng.choice(users), "k": 10}

    def new(rng: random.Random) -> Body:
        bought = rng.choice(sequences)
        length = rng.randint(1, min(10, len(bought)))
        return {"history": [dataset.item_ids[int(item)] for item in bought[:length]], "k": 10}

    return {"known_user": known, "new_user": new}


async def load_cell(
    base: str, make: Callable[[random.Random], Body], clients: int, requests: int, max_seconds: float, seed: int
) -> dict[str, Any]:
    """``requests`` POST /recommend from ``clients`` concurrent clients; latencies and throughput."""
    rng = random.Random(seed)
    bodies = [make(rng) for _ in range(requests)]
    latencies: list[float] = []
    failures = 0
    next_body = 0
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal next_body, failures
        while next_body < len(bodies) and time.perf_counter() - started < max_seconds:
            body = bodies[next_body]
            next_body += 1
            sent = time.perf_counter()
            response = await session.post("/recommend", json=body)
            latencies.append(time.perf_counter() - sent)
            failures += response.status_code != 200

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as session:
        await session.get("/health")  # one connection warm before the clock
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "non_200": failures,
        "wall_seconds": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": 1e3 * ordered[len(ordered) // 2],
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_ms": 1e3 * statistics.fmean(ordered),
    }


WRK_SCRIPT = """
local bodies = {}
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
end
local next_body = 0
request = function()
  next_body = next_body % #bodies + 1
  return wrk.format("POST", "/recommend", {["Content-Type"] = "application/json"}, bodies[next_body])
end
"""


def wrk_cell(
    base: str, make: Callable[[random.Random], Body], clients: int, seconds: float, seed: int
) -> dict[str, Any]:
    """``clients`` connections of wrk (one thread, C) for ``seconds``, cycling through seeded bodies."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as scratch:
        bodies, script = Path(scratch) / "bodies.jsonl", Path(scratch) / "post.lua"
        bodies.write_text("".join(json.dumps(make(rng)) + "\n" for _ in range(5000)))
        script.write_text(WRK_SCRIPT)
        command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
        output = subprocess.run([*command, base, "--", str(bodies)], capture_output=True, text=True, check=True).stdout
    return {"clients": clients, **parse_wrk(output)}


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests, non-2xx answers, p50 / p99 / mean latency (ms) and throughput from wrk's report."""
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def milliseconds(text: str) -> float:
        number = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
        if number is None:
            raise ValueError(f"wrk: cannot read a latency from {text!r}")
        return float(number.group(1)) * units[number.group(2)]

    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.M))
    mean = re.search(r"^\s+Latency\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in ([0-9.]+)(\w+),", output, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if not (percentiles and mean and total):
        raise ValueError(f"wrk: unexpected report:\n{output}")
    wall = float(total.group(2)) * {"s": 1.0, "ms": 1e-3, "m": 60.0}[total.group(3)]
    return {
        "requests": int(total.group(1)),
        "non_200": int(non_2xx.group(1)) if non_2xx else 0,
        "wall_seconds": wall,
        "throughput_rps": int(total.group(1)) / wall,
        "p50_ms": milliseconds(percentiles["50"]),
        "p99_ms": milliseconds(percentiles["99"]),
        "mean_ms": milliseconds(mean.group(1)),
    }


def run_load(
    run: Path,
    clients: list[int],
    requests: int,
    max_seconds: float = 60.0,
    server_threads: int = 1,
    warmup: int = 50,
    client: str = "httpx",
    workers: int = 1,
) -> dict[str, Any]:
    """Every (kind, clients) cell against a fresh service on ``run``; the server is stopped afterwards.
    ``client`` httpx: ``requests`` per cell from this process; wrk: ``max_seconds`` per cell of wrk."""
    makers = request_makers(run)
    port = free_port()
    server = start_server(run, port, server_threads, workers)
    base = f"http://127.0.0.1:{port}"
    try:
        cells = []
        for kind, make in makers.items():
            asyncio.run(load_cell(base, make, 1, warmup, max_seconds, seed=99))
            for count in clients:
                if client == "wrk":
                    cell = wrk_cell(base, make, count, max_seconds, 0)
                else:
                    cell = asyncio.run(load_cell(base, make, count, requests, max_seconds, 0))
                cells.append({"kind": kind, **cell})
        with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
            ready = json.load(response)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "run": str(run),
        "ready": ready,
        "server_threads": server_threads,
        "workers": workers,
        "client": client,
        "cells": cells,
    }


def markdown(result: dict[str, Any]) -> str:
    """The cells as a Markdown table."""
    lines = [
        "| request | clients | requests | p50 ms | p99 ms | mean ms | req/s | non-200 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in result["cells"]:
        lines.append(
            f"| {cell['kind'].replace('_', ' ')} | {cell['clients']} | {cell['requests']} | {cell['p50_ms']:.2f} | "
            f"{cell['p99_ms']:.2f} | {cell['mean_ms']:.2f} | {cell['throughput_rps']:.0f} | {cell['non_200']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished PerPEFT run with its embeddings")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2000, help="per (kind, clients) cell")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per cell")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads per server process")
    parser.add_argument("--workers", type=int, default=1, help="server processes (`serve --workers`)")
    parser.add_argument(
        "--client",
        choices=["httpx", "wrk"],
        default="httpx",
        help="httpx: asyncio clients in this process (--requests per cell); wrk: Debian's wrk, one C thread, "
        "--max-seconds per cell (the lighter client: on 2 cores the Python one costs the server a core)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    clients = [int(count) for count in args.clients.split(",")]
    result = run_load(
        args.run,
        clients,
        args.requests,
        args.max_seconds,
        args.server_threads,
        client=args.client,
        workers=args.workers,
    )
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
