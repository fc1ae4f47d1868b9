"""Benchmark figures: a readable table on the terminal and bench/results/latest.json."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
# The figures issue 7 asks for; a run of every scenario must produce each one.
REQUIRED = (
    "idle_gap.median_ms",
    "idle_gap.p99_ms",
    "idle_gap.utilisation_pct",
    "baseline.idle_gap_median_ms",
    "baseline.ratio",
    "dispatch.p50_ms",
    "dispatch.p99_ms",
    "throughput.created_per_s",
    "throughput.completed_per_s",
    "throughput.vs_pgqueuer",
    "fanout.p50_ms",
    "fanout.p99_ms",
    "image.mb_per_s",
    "memory.generation_rss_mb",
    "memory.worker_rss_mb",
)


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
    load_at_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    # Seconds each scenario took, by name.
    durations: dict[str, float] = field(default_factory=dict)
    # The share of CPU time the VM's host took for others while each scenario
    # ran (/proc/stat steal): the same code measures slower when it is high.
    steal_pct: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float, unit: str, target: str = "", note: str = "") -> None:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{key} is {number}: no figure was measured")
        self.figures.append(Figure(key, round(number, 3), unit, target, note))

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[None]:
        """Time one scenario, and count the CPU the host stole meanwhile."""
        started, before = time.monotonic(), psutil.cpu_times()
        try:
            yield
        finally:
            self.durations[name] = time.monotonic() - started
            after = psutil.cpu_times()
            total = sum(after) - sum(before)
            stolen = getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)
            self.steal_pct[name] = 100 * stolen / total if total > 0 else 0.0

    def missing(self) -> list[str]:
        """Required figures no scenario has added."""
        have = {f.key for f in self.figures}
        return [key for key in REQUIRED if key not in have]

    def machine(self) -> dict[str, Any]:
        return {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "quick": self.quick,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "elapsed_s": round(time.time() - self.started, 1),
            # Other work on the machine shares its cores with the bench.
            "load_average_at_start": [round(x, 2) for x in self.load_at_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "commit": _commit(),
        }

    def write(self, path: Path = RESULTS / "latest.json") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {f.key: f.value for f in self.figures}
        body["machine"] = self.machine()
        body["durations_s"] = {name: round(s, 1) for name, s in self.durations.items()}
        body["steal_pct"] = {name: round(pct, 2) for name, pct in self.steal_pct.items()}
        body["units"] = {f.key: f.unit for f in self.figures}
        body["targets"] = {f.key: f.target for f in self.figures if f.target}
        body["notes"] = {f.key: f.note for f in self.figures if f.note}
        body["missing"] = self.missing()
        path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        return path

    def print(self) -> None:
        table = Table(title="LockN Gen benchmarks" + (" (quick)" if self.quick else ""))
        for column in ("figure", "value", "unit", "target", "note"):
            table.add_column(column, justify="right" if column == "value" else "left")
        for f in self.figures:
            table.add_row(f.key, f"{f.value:,.3f}", f.unit, f.target, f.note)
        Console().print(table)


def _commit() -> str:
    """HEAD, marked '+dirty' when the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS.parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
