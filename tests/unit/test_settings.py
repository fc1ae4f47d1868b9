"""Settings: defaults from the LOC-58 note, and one clear line for each bad value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
        ("DATABASE_URL", "mysql://x", "DATABASE_URL", "postgresql://"),
        ("LOCKN_DATABASE_URL", "mysql://x", "LOCKN_DATABASE_URL", "postgresql://"),
        ("LOCKN_GENERATION_LISTEN", "nowhere", "LOCKN_GENERATION_LISTEN", "host:port"),
        ("LOCKN_LOG_LEVEL", "loud", "LOCKN_LOG_LEVEL", "debug"),
        # JSON-typed settings, at the top level and nested.
        ("LOCKN_WORKERS", "not json", "LOCKN_WORKERS", "must be a JSON array"),
        ("LOCKN_AUTH_TOKENS", "tok:alice", "LOCKN_AUTH_TOKENS", "must be a JSON object"),
        (
            "LOCKN_RETRY__BACKOFF_SECONDS",
            "1,2",
            "LOCKN_RETRY__BACKOFF_SECONDS",
            "must be a JSON array",
        ),
        # Valid JSON, a bad value inside it: the variable, then where in it.
        ("LOCKN_WORKERS", '[{"name": "a"}]', "LOCKN_WORKERS[0].address", "Field required"),
        ("LOCKN_RETRY", '{"attempts": 99}', "LOCKN_RETRY.attempts", "less than or equal to 10"),
    ],
)
def test_a_bad_setting_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str, why: str
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("LOCKN_DATABASE_URL", raising=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    line = str(raised.value)
    assert "\n" not in line
    assert line.startswith(f"invalid setting {named}: ")
    assert why in line


def test_an_unreadable_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKN_CONFIG_FILE", "/nonexistent/lockn.yaml")
    with pytest.raises(SettingsError, match="LOCKN_CONFIG_FILE"):
        load_settings()


@pytest.mark.parametrize(
    ("text", "named", "why"),
    [
        ("Comfyui:\n  TimeoutSeconds: 60\nRetyr:\n  attempts: 2\n", "Retyr", "did you mean retry?"),
        ("ComfyUi:\n  TimeoutSecnds: 6\n", "ComfyUi.TimeoutSecnds", "did you mean timeout_seconds"),
        ("workers:\n  - name: a\n    adress: gpu:50052\n", "workers[0].adress", "did you mean"),
        ("nonsense: 1\n", "nonsense", "unknown key (known: comfyui, retry, "),
    ],
)
def test_a_config_file_key_that_is_no_setting_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, named: str, why: str
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    monkeypatch.setenv("LOCKN_CONFIG_FILE", str(path))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    line = str(raised.value)
    assert "\n" not in line
    assert line.startswith(f"invalid setting {named} in {path}: unknown key")
    assert why in line


def test_a_bad_value_in_the_config_file_is_named_as_the_file_spells_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("Comfyui:\n  TimeoutSeconds: -1\nWorkers:\n  - Name: a\n")
    monkeypatch.setenv("LOCKN_CONFIG_FILE", str(path))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert str(raised.value) == (
        f"invalid setting Comfyui.TimeoutSeconds in {path}: Input should be greater than 0"
    )
    path.write_text("Workers:\n  - Name: a\n")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert str(raised.value) == f"invalid setting Workers[0].address in {path}: Field required"


def test_the_environment_wins_key_by_key_not_section_by_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps({"ComfyUI": {"BaseUrl": "http://gpu-2:8188", "TimeoutSeconds": 60}}))
    monkeypatch.setenv("LOCKN_CONFIG_FILE", str(path))
    monkeypatch.setenv("LOCKN_COMFYUI__POLL_INTERVAL_MS", "500")
    monkeypatch.setenv("LOCKN_COMFYUI__TIMEOUT_SECONDS", "90")
    comfyui = load_settings().comfyui
    assert (str(comfyui.base_url), comfyui.timeout_seconds, comfyui.poll_interval_ms) == (
        "http://gpu-2:8188/",
        90,
        500,
    )


def test_settings_are_read_only_under_the_lockn_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI__TIMEOUT_SECONDS", "7")
    assert load_settings().comfyui.timeout_seconds == 300


@pytest.mark.parametrize("command", [["services.cli", "stats"], ["services.demo"]])
def test_each_entry_point_prints_a_bad_setting_in_one_line(command: list[str]) -> None:
    env = {**os.environ, "LOCKN_AUTH_TOKENS": "tok:alice"}
    ran = subprocess.run(
        [sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 2
    assert ran.stdout == ""
    assert ran.stderr.endswith(
        "invalid setting LOCKN_AUTH_TOKENS: must be a JSON object"
        " (Expecting value at character 0)\n"
    )
    assert ran.stderr.count("\n") == 1
