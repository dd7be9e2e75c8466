"""Dynamic batching: concurrent submissions share calls, each gets its own answers in order, a failure
reaches exactly the batch it happened in."""

import asyncio
import threading

import pytest

from perpeft.engine.service.batching import MicroBatcher


def test_concurrent_submissions_share_calls_and_keep_their_order():
    calls: list[list[int]] = []
    release = threading.Event()

    def answer(items):
        calls.append(list(items))
        release.wait(5)  # the first call blocks until everything else is queued
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(answer, max_batch=5)
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(items)) for items in ([2, 3], [4], [5, 6], [7])]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(scenario())
    assert first == [10] and rest == [[20, 30], [40], [50, 60], [70]]
    # The four queued while [1] ran go out in arrival order, in batches of at most five items.
    assert calls == [[1], [2, 3, 4, 5, 6], [7]]


def test_a_failure_reaches_its_batch_and_the_worker_goes_on():
    def answer(items):
        if "bad" in items:
            raise ValueError("broken batch")
        return [item.upper() for item in items]

    async def scenario():
        batcher = MicroBatcher(answer, max_batch=1)
        with pytest.raises(ValueError, match="broken batch"):
            await batcher.submit(["bad"])
        return await batcher.submit(["fine"])

    assert asyncio.run(scenario()) == ["FINE"]
