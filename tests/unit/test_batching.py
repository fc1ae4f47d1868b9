"""The group-commit batcher: an idle call runs at once and alone, calls made
while batches run go together in the next, and a failing batch fails only
its own callers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.generation.batching import Batcher


class Recorder:
    """A batch runner that records its batches and holds each until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on: int | None = None

    async def run(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.wait_for(self.release.wait(), 5)
        if self.fail_on in items:
            raise ValueError(f"refused {self.fail_on}")
        return [item * 10 for item in items]


async def started(recorder: Recorder, batches: int) -> None:
    async with asyncio.timeout(5):
        while len(recorder.batches) < batches:
            await asyncio.sleep(0)


async def test_a_call_on_an_idle_batcher_runs_at_once_and_alone() -> None:
    recorder = Recorder()
    recorder.release.set()
    batcher = Batcher(recorder.run, max_size=8, max_in_flight=1)
    assert await batcher.submit(1) == 10
    assert await batcher.submit(2) == 20
    assert recorder.batches == [[1], [2]]


async def test_calls_made_while_a_batch_runs_go_together_in_the_next() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, max_size=3, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(0))
    await started(recorder, 1)
    rest = [asyncio.create_task(batcher.submit(n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    recorder.release.set()
    assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    # The first alone; the five that waited in batches of at most three, in order.
    assert recorder.batches == [[0], [1, 2, 3], [4, 5]]


async def test_up_to_max_in_flight_batches_run_side_by_side() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, max_size=8, max_in_flight=2)
    calls = []
    for n in range(2):
        calls.append(asyncio.create_task(batcher.submit(n)))
        await started(recorder, n + 1)
    waiting = [asyncio.create_task(batcher.submit(n)) for n in range(2, 5)]
    await asyncio.sleep(0)
    assert len(recorder.batches) == 2  # both slots busy: the three wait
    recorder.release.set()
    assert await asyncio.gather(*calls, *waiting) == [0, 10, 20, 30, 40]
    assert sorted(map(len, recorder.batches)) == [1, 1, 3]


async def test_a_failing_batch_is_run_again_item_by_item_so_one_item_fails_alone() -> None:
    recorder = Recorder()
    recorder.fail_on = 2
    batcher = Batcher(recorder.run, max_size=8, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await started(recorder, 1)
    together = [asyncio.create_task(batcher.submit(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    recorder.release.set()
    assert await first == 10
    with pytest.raises(ValueError, match="refused 2"):
        await together[0]
    assert await together[1] == 30
    assert recorder.batches == [[1], [2, 3], [2], [3]]
    # The batcher goes on working after a failure.
    assert await batcher.submit(4) == 40


async def test_a_caller_that_stops_waiting_leaves_the_batch_to_finish() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, max_size=8, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await started(recorder, 1)
    impatient = asyncio.create_task(batcher.submit(2))
    patient = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    impatient.cancel()
    recorder.release.set()
    assert (await first, await patient) == (10, 30)
    assert impatient.cancelled()
    assert recorder.batches == [[1], [2, 3]]
