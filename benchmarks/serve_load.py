"""A bounded load test of `perpeft-engine serve` on 127.0.0.1: latency and throughput by client count.

Starts the service on RUN in its own process, waits for ``/ready``, then for each request kind (a known
user, a new user's history) and each number of concurrent clients sends a fixed number of requests from
an asyncio HTTP client (one keep-alive connection per client), stopping early at ``--max-seconds``:

    python benchmarks/serve_load.py --run RUN --clients 1,8,32 --requests 2000 --out load.json

Each cell reports p50 / p99 / mean latency (client side, send to last byte), throughput (answered
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
import socket
import statistics
import subprocess
import sys
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


def start_server(run: Path, port: int, threads: int) -> subprocess.Popen:
    """`perpeft-engine serve` on 127.0.0.1:``port``, returned once ``/ready`` answers."""
    command = [sys.executable, "-m", "perpeft.cli", "--threads", str(threads), "serve", "--run", str(run)]
    command += ["--port", str(port), "--log-level", "warning"]
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


def run_load(
    run: Path,
    clients: list[int],
    requests: int,
    max_seconds: float = 60.0,
    server_threads: int = 1,
    warmup: int = 50,
) -> dict[str, Any]:
    """Every (kind, clients) cell against a fresh service on ``run``; the server is stopped afterwards."""
    makers = request_makers(run)
    port = free_port()
    server = start_server(run, port, server_threads)
    base = f"http://127.0.0.1:{port}"
    try:
        cells = []
        for kind, make in makers.items():
            asyncio.run(load_cell(base, make, 1, warmup, max_seconds, seed=99))
            for count in clients:
                cells.append({"kind": kind, **asyncio.run(load_cell(base, make, count, requests, max_seconds, 0))})
        with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
            ready = json.load(response)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"run": str(run), "ready": ready, "server_threads": server_threads, "cells": cells}


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
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    clients = [int(count) for count in args.clients.split(",")]
    result = run_load(args.run, clients, args.requests, args.max_seconds, args.server_threads)
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
