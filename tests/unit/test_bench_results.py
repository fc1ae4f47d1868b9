"""The benchmark report (bench/results.py), without running a benchmark: it
writes every figure issue 7 asks for as a number, says which are missing,
and refuses a figure that was never measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.results import REQUIRED, Report


def test_a_complete_report_writes_every_key_as_a_number(tmp_path: Path) -> None:
    report = Report(quick=True)
    for n, key in enumerate(REQUIRED):
        report.add(key, n + 0.12345, "ms", note="a note" if n == 0 else "")
    report.add("throughput.generation_cpu_ms_per_job", 8.5, "ms")
    report.durations["idle_gap"] = 12.34
    assert report.missing() == []

    body = json.loads(report.write(tmp_path / "latest.json").read_text())

    for n, key in enumerate(REQUIRED):
        assert isinstance(body[key], float) and math.isfinite(body[key])
        assert body[key] == round(n + 0.12345, 3)
    assert body["throughput.generation_cpu_ms_per_job"] == 8.5
    assert body["missing"] == []
    assert body["machine"]["quick"] is True
    assert body["machine"]["cpus"] >= 1
    assert len(body["machine"]["load_average_at_start"]) == 3
    assert body["durations_s"] == {"idle_gap": 12.3}
    assert body["units"]["dispatch.p50_ms"] == "ms"
    assert body["notes"] == {REQUIRED[0]: "a note"}


def test_missing_figures_are_named_in_order(tmp_path: Path) -> None:
    report = Report(quick=False)
    report.add("dispatch.p50_ms", 3.0, "ms")
    report.add("dispatch.p99_ms", 9.0, "ms")

    missing = report.missing()

    assert "dispatch.p50_ms" not in missing
    assert missing == [k for k in REQUIRED if not k.startswith("dispatch.")]
    assert json.loads(report.write(tmp_path / "r.json").read_text())["missing"] == missing


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_figure_that_was_not_measured_is_refused(value: float) -> None:
    # percentile() of no samples is NaN; it must fail the scenario, not reach the JSON.
    report = Report(quick=True)
    with pytest.raises(ValueError, match=r"fanout\.p99_ms"):
        report.add("fanout.p99_ms", value, "ms")
    assert report.figures == []
