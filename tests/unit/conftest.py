"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

from services.comfy_worker.comfyui import ComfyUIClient
from services.comfy_worker.tracker import Tracker
from services.simulator.app import RECORDED_VERSION


@pytest.fixture
def tracker() -> Tracker:
    """A tracker with no socket, fed frames by hand, of a ComfyUI of the
    release the recordings come from."""
    client = ComfyUIClient("http://127.0.0.1:1")
    client.know_version(RECORDED_VERSION)
    return Tracker(client)
