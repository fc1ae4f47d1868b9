"""Fixtures shared by the suites that run the services as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack import LocalStack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A stack of real processes, every one of them stopped after the test."""
    processes = LocalStack(tmp_path / "logs")
    try:
        yield processes
    finally:
        processes.stop()
