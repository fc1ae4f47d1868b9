"""Group commit: concurrent calls that share one statement.

A call made while fewer than `max_in_flight` batches are running starts one
at once, so an idle service waits for nothing; calls made while they all run
collect and go together in the next. Under load, what a statement costs
whatever it carries (a round trip, a commit and its fsync, a count of the
queue) is paid once per batch instead of once per call. A batch that fails
is run again item by item, so that an item the statement refuses fails its
own call and no other: `run` must change nothing when it raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        max_size: int,
        max_in_flight: int,
    ) -> None:
        """`run` takes a batch and returns one result per item, in order."""
        self._run = run
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_size]
                del self._waiting[: self._max_size]
                await self._settle(batch)
        except asyncio.CancelledError:
            # Shutting down: nobody is left to run what waits.
            for _, future in self._waiting:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            # In the same step as the emptiness check above, so that a call
            # arriving now always finds a batch running or starts one.
            self._in_flight -= 1

    async def _settle(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(error)
                return
            for one in batch:
                await self._settle([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            # A caller that stopped waiting has cancelled its future.
            if not future.done():
                future.set_result(result)
