"""The local stack of real processes: what the caller sets wins over the free
ports it picks, and what a killed stack left running is found and stopped."""

from __future__ import annotations

import os

from services.embedded_postgres import free_port
from services.stack import STOP_TIMEOUT, LocalStack, stop_leftovers


async def test_a_listen_address_the_caller_sets_wins_over_a_free_port(stack: LocalStack) -> None:
    simulator = stack.start_simulator(step_seconds=0.001)
    await stack.wait_serving(simulator)
    port = free_port()
    worker = stack.start_worker("worker", simulator.address, LOCKN_WORKER_LISTEN=f"0.0.0.0:{port}")
    assert worker.address == f"127.0.0.1:{port}"
    await stack.wait_serving(worker)


async def test_parts_a_killed_stack_left_running_are_stopped_by_the_next(
    stack: LocalStack,
) -> None:
    simulator = stack.start_simulator(step_seconds=0.001)
    await stack.wait_serving(simulator)
    # The stack's owner dies here without stopping it; the next one finds its record.
    reused = stack.logs / "reused.pid"
    reused.write_text(f"{os.getpid()} 1\n")  # this test's pid, started at another time

    assert stop_leftovers(stack.logs) == ["simulator"]

    assert simulator.process.wait(STOP_TIMEOUT) is not None
    assert list(stack.logs.glob("*.pid")) == []


async def test_a_stopped_stack_leaves_no_record(stack: LocalStack) -> None:
    simulator = stack.start_simulator(step_seconds=0.001)
    await stack.wait_serving(simulator)
    assert [p.name for p in stack.logs.glob("*.pid")] == ["simulator.pid"]
    stack.stop()
    assert list(stack.logs.glob("*.pid")) == []
    assert stop_leftovers(stack.logs) == []
