"""The services' event loop (services/event_loop.py) and who runs on it."""

from __future__ import annotations

import asyncio
import sys

import pytest

from services import event_loop
from services.cli import build_parser


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not exist on Windows")
def test_the_services_loop_is_uvloop_where_installed() -> None:
    assert event_loop.run(loop_module()).startswith("uvloop")


def test_without_uvloop_the_standard_loop_runs_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    assert event_loop.run(loop_module()).startswith("asyncio")


@pytest.mark.parametrize("command", ["generation-service", "comfy-worker", "gateway"])
def test_each_service_runs_on_the_services_loop(command: str) -> None:
    assert build_parser().parse_args([command]).loop is event_loop.run


def test_the_simulator_keeps_the_standard_loop() -> None:
    # A stand-in for ComfyUI: making it faster would flatter the benchmarks.
    assert build_parser().parse_args(["simulate-comfyui"]).loop is asyncio.run
