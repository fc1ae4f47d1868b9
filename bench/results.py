"""Benchmark figures: a readable table on the terminal and bench/results/latest.json."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"


@dataclass
class Figure:
    key: str
    value: float
    unit: str
    target: str = ""
    note: str = ""


@dataclass
class Report:
    quick: bool
    figures: list[Figure] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, key: str, value: float, unit: str, target: str = "", note: str = "") -> None:
        self.figures.append(Figure(key, round(float(value), 3), unit, target, note))

    def machine(self) -> dict[str, Any]:
        return {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "quick": self.quick,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
        }

    def write(self, path: Path = RESULTS / "latest.json") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {f.key: f.value for f in self.figures}
        body["machine"] = self.machine()
        body["notes"] = {f.key: f.note for f in self.figures if f.note}
        path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        return path

    def print(self) -> None:
        table = Table(title="LockN Gen benchmarks" + (" (quick)" if self.quick else ""))
        for column in ("figure", "value", "unit", "target", "note"):
            table.add_column(column, justify="right" if column == "value" else "left")
        for f in self.figures:
            table.add_row(f.key, f"{f.value:,.3f}", f.unit, f.target, f.note)
        Console().print(table)
