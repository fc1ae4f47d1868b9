"""The benchmark report (bench/results.py), without running a benchmark: it
writes every figure issue 7 asks for as a number, says which are missing,
and refuses a figure that was never measured."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from pathlib import Path

import pytest

from bench.results import REQUIRED, Report


def test_a_complete_report_writes_every_key_as_a_number(tmp_path: Path) -> None:
    report = Report(quick=True)
    for n, key in enumerate(REQUIRED):
        report.add(key, n + 0.12345, "ms", note="a note" if n == 0 else "")
    report.add("throughput.generation_cpu_ms_per_job", 8.5, "ms")
    with report.scenario("idle_gap"):
        sum(range(200_000))  # some CPU time for the steal share to divide
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
    assert list(body["durations_s"]) == ["idle_gap"] and body["durations_s"]["idle_gap"] >= 0
    assert list(body["steal_pct"]) == ["idle_gap"] and 0 <= body["steal_pct"]["idle_gap"] <= 100
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


def test_a_scenario_records_the_share_of_cpu_time_the_host_stole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Times = namedtuple("Times", "user system idle steal")
    readings = iter([Times(10.0, 5.0, 80.0, 5.0), Times(40.0, 15.0, 110.0, 15.0)])
    monkeypatch.setattr("bench.results.psutil.cpu_times", lambda: next(readings))
    report = Report(quick=True)

    with report.scenario("image"):
        pass

    # 80 s of CPU time passed, 10 of them stolen.
    assert report.steal_pct["image"] == pytest.approx(100 * 10 / 80)
