"""Settings: defaults from the LOC-58 note, and one clear line for each bad value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.settings import SettingsError, load_settings


def test_defaults_follow_the_loc58_comfyui_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = load_settings()
    assert str(settings.comfyui.base_url) == "http://localhost:8188/"
    assert settings.comfyui.timeout_seconds == 300
    assert settings.comfyui.poll_interval_ms == 2000
    assert settings.comfyui.max_concurrent_generations == 1
    assert settings.comfyui.workflows_path == Path("./workflows")
    assert settings.comfyui.output_path == Path("./outputs")


def test_environment_overrides_nested_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKN_COMFYUI__BASE_URL", "http://gpu-1:8188")
    monkeypatch.setenv("LOCKN_COMFYUI__MAX_CONCURRENT_GENERATIONS", "2")
    monkeypatch.setenv("LOCKN_WORKERS", '[{"name": "a", "address": "gpu-1:50052"}]')
    settings = load_settings()
    assert str(settings.comfyui.base_url) == "http://gpu-1:8188/"
    assert settings.comfyui.max_concurrent_generations == 2
    assert [w.address for w in settings.workers] == ["gpu-1:50052"]


def test_config_file_accepts_the_loc58_appsettings_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps({"ComfyUi": {"BaseUrl": "http://gpu-2:8188", "TimeoutSeconds": 60}}))
    monkeypatch.setenv("LOCKN_CONFIG_FILE", str(path))
    settings = load_settings()
    assert str(settings.comfyui.base_url) == "http://gpu-2:8188/"
    assert settings.comfyui.timeout_seconds == 60


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lockn.yaml"
    path.write_text("comfyui:\n  timeout_seconds: 60\n")
    monkeypatch.setenv("LOCKN_CONFIG_FILE", str(path))
    monkeypatch.setenv("LOCKN_COMFYUI__TIMEOUT_SECONDS", "90")
    assert load_settings().comfyui.timeout_seconds == 90


@pytest.mark.parametrize(
    ("variable", "value", "named", "why"),
    [
        ("LOCKN_COMFYUI__BASE_URL", "not a url", "LOCKN_COMFYUI__BASE_URL", "URL"),
        (
            "LOCKN_COMFYUI__TIMEOUT_SECONDS",
            "-5",
            "LOCKN_COMFYUI__TIMEOUT_SECONDS",
            "greater than 0",
        ),
        ("DATABASE_URL", "mysql://x", "LOCKN_DATABASE_URL", "postgresql://"),
        ("LOCKN_GENERATION_LISTEN", "nowhere", "LOCKN_GENERATION_LISTEN", "host:port"),
        ("LOCKN_LOG_LEVEL", "loud", "LOCKN_LOG_LEVEL", "debug"),
    ],
)
def test_a_bad_setting_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str, why: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    line = str(raised.value)
    assert "\n" not in line
    assert named in line
    assert why in line


def test_an_unreadable_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKN_CONFIG_FILE", "/nonexistent/lockn.yaml")
    with pytest.raises(SettingsError, match="LOCKN_CONFIG_FILE"):
        load_settings()
