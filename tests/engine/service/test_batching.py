"""Dynamic batching: concurrent submissions share calls, each gets its own answers in order, a failure
reaches exactly the batch it happened in."""

import asyncio

import pytest

from perpeft.engine.service.batching import MicroBatcher


def test_concurrent_submissions_share_calls_and_keep_their_order():
    calls: list[list[int]] = []
    rest: list[asyncio.Future] = []

    def answer(items):
        calls.append(list(items))
        if items == [1]:  # the others are submitted while the first batch is being answered
            rest.extend(asyncio.ensure_future(batcher.submit(more)) for more in ([2, 3], [4], [5, 6], [7]))
        return [item * 10 for item in items]

    batcher = MicroBatcher(answer, max_batch=5)

    async def scenario():
        first = await batcher.submit([1])
        return first, await asyncio.gather(*rest)

    first, answers = asyncio.run(scenario())
    assert first == [10] and answers == [[20, 30], [40], [50, 60], [70]]
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


def test_submissions_arriving_over_a_few_loop_turns_join_one_batch():
    calls: list[list[int]] = []

    def answer(items):
        calls.append(list(items))
        return items

    async def scenario():
        batcher = MicroBatcher(answer, max_batch=8)

        async def submit_after(turns: int) -> list[int]:
            for _ in range(turns):
                await asyncio.sleep(0)
            return await batcher.submit([turns])

        return await asyncio.gather(*(submit_after(turns) for turns in range(3)))

    assert asyncio.run(scenario()) == [[0], [1], [2]]
    # The worker waits while the queue grows, so the three share one call instead of one each.
    assert calls == [[0, 1, 2]]
