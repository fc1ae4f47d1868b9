"""The event loop the services run on: uvloop where it is installed.

GenerationService, the workers and the gateway spend much of their time in
the loop itself: waking a task per watcher for every event, a callback per
gRPC completion, a read per websocket frame. uvloop does that work in C;
with 1,000 watchers of one generation it cut GenerationService's CPU per
delivery from 66-68 to 56-58 us (BENCHMARKS.md). Where uvloop is missing
(Windows has none) the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop when it can be imported."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
