"""Fan-out of generation events to this replica's Watch subscribers.

One LISTEN connection per replica. A notification names a generation, an
event sequence and the owner; the hub reads that event row once and hands it
to every subscriber waiting for exactly that sequence. A subscriber that is
behind (it joined late, its buffer filled because it reads slowly, or the
listening connection dropped) reads what it missed from the events table, so
it gets every event in order, with no gap and no duplicate, whatever happens
to notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
from asyncpg import Record

from services.database import connect
from services.generation.queue import EVENTS_CHANNEL, QUEUED_CHANNEL, TERMINAL, Queue
from services.log import get_logger

log = get_logger(component="events")
BUFFER = 256


class Subscription:
    """One Watch stream of one generation, from `after` on."""

    def __init__(self, generation_id: uuid.UUID, after: int) -> None:
        self.generation_id = generation_id
        self.last = after
        self.buffer: deque[Record] = deque()
        self.behind = True  # read the table once at start: events may precede the subscription
        # A future per wait rather than an asyncio.Event: 1,000 watchers of a
        # generation are 1,000 wake-ups per event, and Event looks the running
        # loop up on every wait.
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._woken = True

    def offer(self, event: Record) -> None:
        if len(self.buffer) < BUFFER:
            self.buffer.append(event)
        else:
            self.behind = True
        self._wake()

    def mark_behind(self) -> None:
        self.behind = True
        self._wake()

    def _wake(self) -> None:
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def woken(self) -> None:
        """Until offer() or mark_behind() since the last time this returned."""
        if not self._woken:
            self._waiter = self._loop.create_future()
            await self._waiter
        self._woken = False

    def take_buffered(self) -> list[Record]:
        """The buffered events that follow on from the last one, in order; a gap
        (or a full buffer) marks the subscription behind instead."""
        ready: list[Record] = []
        while self.buffer and not self.behind:
            event = self.buffer.popleft()
            if event["seq"] <= self.last:
                continue  # already read from the table
            if event["seq"] != self.last + 1:
                self.behind = True  # a gap: the table has what is missing
                break
            ready.append(event)
            self.last = event["seq"]
        return ready


class PrincipalSubscription:
    """WatchGenerations: every event of one caller's generations, as they come."""

    def __init__(self, principal: str) -> None:
        self.principal = principal
        self.events: asyncio.Queue[Record | None] = asyncio.Queue(maxsize=BUFFER * 4)

    def offer(self, event: Record | None) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.events.put_nowait(event)


class EventHub:
    def __init__(self, dsn: str, queue: Queue, on_queued: Callable[[], None]) -> None:
        self.dsn = dsn
        self.queue = queue
        self.on_queued = on_queued
        self.listening = asyncio.Event()
        self._by_generation: dict[uuid.UUID, set[Subscription]] = {}
        self._by_principal: dict[str, set[PrincipalSubscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        # The latest delivery of each generation: the next one hands its event
        # over only after it, so subscribers get each generation's events in order.
        self._latest: dict[uuid.UUID, asyncio.Task[None]] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="event-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in [s for group in self._by_principal.values() for s in group]:
            sub.offer(None)

    # ----- subscribers ------------------------------------------------------------------

    async def watch(self, generation_id: uuid.UUID, after: int) -> AsyncIterator[Record]:
        """Every event after `after`, in order, until (and including) a terminal one."""
        sub = Subscription(generation_id, after)
        self._by_generation.setdefault(generation_id, set()).add(sub)
        try:
            while True:
                await sub.woken()
                ready = sub.take_buffered()
                if sub.behind:
                    ready += await self._read_missed(sub)
                for event in ready:
                    yield event
                    if event["type"] in TERMINAL:
                        return
        finally:
            group = self._by_generation.get(generation_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._by_generation[generation_id]

    async def _read_missed(self, sub: Subscription) -> list[Record]:
        sub.behind = False
        sub.buffer.clear()
        missed = await self.queue.events_after(sub.generation_id, sub.last)
        if len(missed) == 500:
            sub.mark_behind()  # more to read on the next turn
        if missed:
            sub.last = missed[-1]["seq"]
        return missed

    @contextlib.contextmanager
    def watch_principal(self, principal: str) -> Any:
        sub = PrincipalSubscription(principal)
        self._by_principal.setdefault(principal, set()).add(sub)
        try:
            yield sub
        finally:
            group = self._by_principal.get(principal, set())
            group.discard(sub)
            if not group:
                self._by_principal.pop(principal, None)

    # ----- the listening connection ---------------------------------------------------

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self.dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(EVENTS_CHANNEL, self._on_event)
                await conn.add_listener(QUEUED_CHANNEL, lambda *_: self.on_queued())
                if not await self.queue.hold_liveness(conn):
                    log.warning("liveness_lock_taken", owner=self.queue.owner)
                self.listening.set()
                # Anything notified while we were not listening: re-read and re-scan.
                self._everyone_behind()
                self.on_queued()
                delay = 0.1
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await lost.wait()
                    if not lost.is_set() and not await _alive(conn):
                        break
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("listen_failed", error=str(error) or type(error).__name__)
            finally:
                self.listening.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _everyone_behind(self) -> None:
        for group in self._by_generation.values():
            for sub in group:
                sub.mark_behind()

    def _on_event(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        generation, seq, principal = payload.split(":", 2)
        generation_id = uuid.UUID(generation)
        if generation_id not in self._by_generation and principal not in self._by_principal:
            return
        previous = self._latest.get(generation_id)
        task = asyncio.create_task(self._deliver(generation_id, int(seq), principal, previous))
        self._latest[generation_id] = task
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(functools.partial(self._forget, generation_id))

    def _forget(self, generation_id: uuid.UUID, task: asyncio.Task[None]) -> None:
        if self._latest.get(generation_id) is task:
            del self._latest[generation_id]

    async def _deliver(
        self,
        generation_id: uuid.UUID,
        seq: int,
        principal: str,
        previous: asyncio.Task[None] | None = None,
    ) -> None:
        try:
            event = await self.queue.event(generation_id, seq)
        except Exception as error:  # the subscribers catch up from the table instead
            log.warning("event_read_failed", error=str(error))
            event = None
            for sub in self._by_generation.get(generation_id, ()):
                sub.mark_behind()
        # Reads run concurrently; hand-overs keep the notification order.
        if previous is not None:
            await asyncio.wait([previous])  # however it ended
        if event is None:
            return
        for sub in list(self._by_generation.get(generation_id, ())):
            sub.offer(event)
        for psub in list(self._by_principal.get(principal, ())):
            psub.offer(event)


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=3)
        return True
    except Exception:
        return False
