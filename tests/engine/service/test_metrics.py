"""Metrics of several server processes add up: merged snapshots, and a process's exposition through the
shared directory."""

import asyncio
import json
import re

from perpeft.engine.service.metrics import RequestMetrics, SharedMetrics


def value(text: str, name: str, labels: str) -> float:
    return float(re.search(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE).group(1))


def test_snapshots_of_processes_add_up():
    first, second = RequestMetrics(), RequestMetrics()
    first.observe("/recommend", "POST", 200, 0.003)
    first.served("known_user", 2)
    second.observe("/recommend", "POST", 200, 0.03)
    second.observe("/recommend", "POST", 422, 0.001)
    second.served("known_user")
    text = RequestMetrics.merged([first.snapshot(), second.snapshot()]).exposition()
    assert value(text, "perpeft_requests_total", 'route="/recommend",method="POST",status="200"') == 2
    assert value(text, "perpeft_requests_total", 'route="/recommend",method="POST",status="422"') == 1
    assert value(text, "perpeft_request_seconds_bucket", 'route="/recommend",method="POST",le="0.005"') == 2
    assert value(text, "perpeft_request_seconds_count", 'route="/recommend",method="POST"') == 3
    assert value(text, "perpeft_request_seconds_sum", 'route="/recommend",method="POST"') == 0.034
    assert value(text, "perpeft_users_served_total", 'assigned_by="known_user"') == 3


def test_a_process_exposes_everyone_it_shares_a_directory_with(tmp_path):
    other = RequestMetrics()
    other.observe("/health", "GET", 200, 0.001)
    (tmp_path / "worker-1.json").write_text(json.dumps(other.snapshot()))
    own = RequestMetrics()
    own.observe("/health", "GET", 200, 0.002)
    shared = SharedMetrics(own, tmp_path)

    async def publish_once():
        task = asyncio.ensure_future(shared.publish(interval=60))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(publish_once())
    assert shared.path.is_file()  # what the other processes read
    text = shared.exposition()
    assert value(text, "perpeft_requests_total", 'route="/health",method="GET",status="200"') == 2
