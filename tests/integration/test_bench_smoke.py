"""A smoke run of the benchmark harness, so `make bench` does not rot between
runs: one quick scenario on real processes, its figure recorded. No timing is
asserted (benchmarks are not tests), only that a figure was measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.results import Report
from bench.scenarios import Bench, image_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_the_image_scenario_measures_its_figure(postgres_server: str, tmp_path: Path) -> None:
    report = Report(quick=True)

    await image_path(Bench(postgres_server, True, tmp_path, report))

    (figure,) = report.figures
    assert figure.key == "image.mb_per_s"
    assert figure.value > 0
    assert "8.3 MB" in figure.note
