"""Logs are JSON events with bound context, and secrets never reach them."""

from __future__ import annotations

import json

import pytest

from services.log import configure_logging, get_logger


def test_events_are_json_lines_with_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    get_logger(component="test").bind(generation_id="g1").info("generation_dispatched", worker="w")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "generation_dispatched"
    assert line == line | {"component": "test", "generation_id": "g1", "worker": "w"}
    assert line["level"] == "info" and "timestamp" in line


def test_values_of_secret_looking_keys_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    get_logger().info(
        "settings_loaded",
        worker_token="tok-123",
        authorization="Bearer tok-456",
        database_url="postgresql://u:pw-789@h/db",
        client_password="pw-000",
    )
    out = capsys.readouterr().err
    for secret in ("tok-123", "tok-456", "pw-789", "pw-000"):
        assert secret not in out
    assert json.loads(out.strip().splitlines()[-1])["worker_token"] == "***"


def test_levels_below_the_configured_one_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "json")
    get_logger().info("quiet")
    get_logger().warning("loud")
    out = capsys.readouterr().err
    assert "quiet" not in out and "loud" in out
