"""The README's configuration table lists exactly the settings the code reads."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY
from pydantic import BaseModel

import services.metrics  # noqa: F401  (registers the metrics)
from services.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def setting_variables(model: type[BaseModel] = Settings, prefix: str = "LOCKN_") -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= setting_variables(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def documented_variables() -> set[str]:
    table = [line for line in README.read_text().splitlines() if line.startswith("| `LOCKN_")]
    return {name for line in table for name in re.findall(r"`(LOCKN_[A-Z_]+)`", line.split("|")[1])}


def test_every_setting_is_documented() -> None:
    assert sorted(setting_variables() - documented_variables()) == []


def test_every_documented_setting_exists() -> None:
    assert sorted(documented_variables() - setting_variables()) == []


def test_the_quick_start_is_the_two_commands() -> None:
    text = README.read_text()
    assert "    make demo" in text and "    make test" in text


def test_every_metric_is_documented_and_every_documented_one_exists() -> None:
    defined = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for metric in REGISTRY.collect()
        if metric.name.startswith("lockn_")
    }
    documented = set(re.findall(r"^\| `(lockn_[a-z_]+)` \|", README.read_text(), re.M))
    assert defined and documented == defined
