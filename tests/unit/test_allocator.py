"""The malloc tuning the services apply at start (services/allocator.py)."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from services import allocator


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt's parameters are glibc's own"
)
def test_glibc_takes_the_tuning() -> None:
    assert allocator.reuse_large_blocks() is True


def test_without_a_c_library_it_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.reuse_large_blocks() is False
