"""Request counts and latency histograms of the service, exposed in Prometheus' text format.

With several server processes (`serve --workers N`) each keeps its own figures and publishes them
(`SharedMetrics`) to a directory the processes share, once a second; ``/metrics`` from any of them adds
everyone's up, so a scrape sees the whole service (the other processes' part at most a second old).
"""

import asyncio
import json
import os
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from perpeft.engine.runtime.atomic import atomic_write_json

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RequestMetrics:
    """Per (route, method) latency histograms, per (route, status) counts and served users per assignment
    rule; thread-safe (sync endpoints run in a thread pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sums: defaultdict[tuple[str, str], float] = defaultdict(float)
        self._statuses: Counter[tuple[str, str, int]] = Counter()
        self._assigned: Counter[str] = Counter()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one finished request."""
        with self._lock:
            key = (route, method)
            counts = self._buckets.setdefault(key, [0] * (len(LATENCY_BUCKETS) + 1))
            position = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
            counts[position] += 1
            self._sums[key] += seconds
            self._statuses[(route, method, status)] += 1

    def served(self, assigned_by: str, count: int = 1) -> None:
        """Record ``count`` users answered under an assignment rule (known user, nearest centroid)."""
        with self._lock:
            self._assigned[assigned_by] += count

    def snapshot(self) -> dict[str, Any]:
        """Everything recorded, as JSON-able lists (what `merged` reads back)."""
        with self._lock:
            return {
                "buckets": [[*key, counts] for key, counts in self._buckets.items()],
                "sums": [[*key, total] for key, total in self._sums.items()],
                "statuses": [[*key, count] for key, count in self._statuses.items()],
                "assigned": dict(self._assigned),
            }

    @classmethod
    def merged(cls, snapshots: Iterable[dict[str, Any]]) -> "RequestMetrics":
        """The sum of several processes' `snapshot`s."""
        total = cls()
        for snapshot in snapshots:
            for route, method, counts in snapshot["buckets"]:
                into = total._buckets.setdefault((route, method), [0] * (len(LATENCY_BUCKETS) + 1))
                total._buckets[(route, method)] = [a + b for a, b in zip(into, counts, strict=True)]
            for route, method, seconds in snapshot["sums"]:
                total._sums[(route, method)] += seconds
            for route, method, status, count in snapshot["statuses"]:
                total._statuses[(route, method, status)] += count
            total._assigned.update(snapshot["assigned"])
        return total

    def exposition(self) -> str:
        """Everything recorded, in the Prometheus text exposition format (version 0.0.4)."""
        lines = [
            "# HELP perpeft_request_seconds Request latency in the server, from the app receiving it to the last response byte.",
            "# TYPE perpeft_request_seconds histogram",
        ]
        with self._lock:
            for (route, method), counts in sorted(self._buckets.items()):
                labels = f'route="{route}",method="{method}"'
                total = 0
                for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                    total += count
                    edge = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'perpeft_request_seconds_bucket{{{labels},le="{edge}"}} {total}')
                lines.append(f"perpeft_request_seconds_sum{{{labels}}} {self._sums[(route, method)]:.6f}")
                lines.append(f"perpeft_request_seconds_count{{{labels}}} {total}")
            lines += [
                "# HELP perpeft_requests_total Requests by route and status.",
                "# TYPE perpeft_requests_total counter",
            ]
            for (route, method, status), count in sorted(self._statuses.items()):
                lines.append(f'perpeft_requests_total{{route="{route}",method="{method}",status="{status}"}} {count}')
            lines += [
                "# HELP perpeft_users_served_total Users answered, by how their group was chosen.",
                "# TYPE perpeft_users_served_total counter",
            ]
            for rule, count in sorted(self._assigned.items()):
                lines.append(f'perpeft_users_served_total{{assigned_by="{rule}"}} {count}')
        return "\n".join(lines) + "\n"


PUBLISH_SECONDS = 1.0


class SharedMetrics:
    """One process's `RequestMetrics` (``own``) among several: published to ``directory`` as
    ``worker-PID.json`` by `publish`, added up with the others' files by `exposition`."""

    def __init__(self, own: RequestMetrics, directory: Path) -> None:
        self.own, self.directory = own, directory
        self.path = directory / f"worker-{os.getpid()}.json"

    async def publish(self, interval: float = PUBLISH_SECONDS) -> None:
        """Write this process's figures every ``interval`` seconds, for as long as the task runs."""
        while True:
            atomic_write_json(self.path, self.own.snapshot())
            await asyncio.sleep(interval)

    def exposition(self) -> str:
        """Every process's figures added up: this one's as they are now, the others' as last published."""
        snapshots = [self.own.snapshot()]
        for path in self.directory.glob("worker-*.json"):
            if path != self.path:
                try:
                    snapshots.append(json.loads(path.read_text()))
                except (OSError, ValueError):  # a worker that left between the listing and the read
                    continue
        return RequestMetrics.merged(snapshots).exposition()
