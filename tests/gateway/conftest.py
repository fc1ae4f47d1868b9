"""Fixtures of the gateway tests beyond tests/fixtures/gateway.py."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

ServerErrors = Callable[[], list[str]]


@pytest.fixture
def server_errors(caplog: pytest.LogCaptureFixture) -> ServerErrors:
    """What aiohttp's server has logged at ERROR so far: each is a failure it
    saw in a handler or a connection, logged as a multi-line traceback."""
    caplog.set_level(logging.ERROR, logger="aiohttp")

    def logged() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("aiohttp") and r.levelno >= logging.ERROR
        ]

    return logged
