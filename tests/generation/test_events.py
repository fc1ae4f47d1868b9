"""The event hub's promise to a watcher: every event after its starting point,
in order, once each, whatever the notifications do (late, missing, or more
than its buffer holds). The table is a stand-in here, so each case can make
the notifications misbehave exactly."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from services.generation.events import BUFFER, EventHub

PRINCIPAL = "alice"


class Table:
    """The events table as the hub reads it (Queue.event and Queue.events_after)."""

    def __init__(self, generation_id: uuid.UUID) -> None:
        self.generation_id = generation_id
        self.rows: list[dict[str, Any]] = []
        self.reads_after: list[int] = []

    def append(self, kind: str = "PROGRESS") -> int:
        seq = len(self.rows) + 1
        self.rows.append({"generation_id": self.generation_id, "seq": seq, "type": kind})
        return seq

    async def event(self, generation_id: uuid.UUID, seq: int) -> dict[str, Any] | None:
        return self.rows[seq - 1] if 0 < seq <= len(self.rows) else None

    async def events_after(
        self, generation_id: uuid.UUID, after: int, limit: int = 500
    ) -> list[dict[str, Any]]:
        self.reads_after.append(after)
        return self.rows[after : after + limit]


async def watching(
    hub: EventHub, table: Table, after: int = 0
) -> tuple[asyncio.Task[Any], list[int]]:
    seen: list[int] = []

    async def watch() -> None:
        async for event in hub.watch(table.generation_id, after):
            seen.append(event["seq"])

    task = asyncio.create_task(watch())
    while table.generation_id not in hub._by_generation:
        await asyncio.sleep(0)
    return task, seen


def notify(hub: EventHub, table: Table, seq: int) -> None:
    hub._on_event(None, 0, "lockn_events", f"{table.generation_id}:{seq}:{PRINCIPAL}")


async def settled(hub: EventHub) -> None:
    for _ in range(20):
        await asyncio.gather(*hub._pending)
        await asyncio.sleep(0)


def hub_and_table() -> tuple[EventHub, Table]:
    table = Table(uuid.uuid4())
    return EventHub("unused", table, lambda: None), table  # type: ignore[arg-type]


async def test_history_first_then_each_notified_event_to_the_end() -> None:
    hub, table = hub_and_table()
    for _ in range(3):
        table.append()
    task, seen = await watching(hub, table, after=1)
    await settled(hub)
    assert seen == [2, 3]  # from the table: they came before the watch
    for kind in ("PROGRESS", "COMPLETED"):
        notify(hub, table, table.append(kind))
    await asyncio.wait_for(task, 5)
    assert seen == [2, 3, 4, 5]
    assert table.reads_after == [1]  # the two new ones came with their notifications


async def test_a_missed_notification_is_read_from_the_table_in_order() -> None:
    hub, table = hub_and_table()
    task, seen = await watching(hub, table)
    await settled(hub)
    table.append()
    notify(hub, table, table.append())  # 1 was never notified: 2 arrives after a gap
    await settled(hub)
    notify(hub, table, table.append("COMPLETED"))
    await asyncio.wait_for(task, 5)
    assert seen == [1, 2, 3]


async def test_a_watcher_that_falls_a_buffer_behind_catches_up_from_the_table() -> None:
    hub, table = hub_and_table()
    task, seen = await watching(hub, table)
    await settled(hub)
    (sub,) = hub._by_generation[table.generation_id]
    for _ in range(BUFFER + 10):  # offered faster than the stream is read
        sub.offer(table.rows[table.append() - 1])
    sub.offer(table.rows[table.append("COMPLETED") - 1])
    await asyncio.wait_for(task, 5)
    assert seen == list(range(1, BUFFER + 12))
    assert len(table.reads_after) == 2  # the start, and once after the overflow
