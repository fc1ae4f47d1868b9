"""A smoke run of the benchmark harness, so `make bench` does not rot between
runs: one quick scenario on real processes, its figure recorded, and the
throughput scenario's pgqueuer yardstick. No timing is asserted (benchmarks
are not tests), only that each figure was measured."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from bench.pgqueuer_reference import measure_pgqueuer
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


async def test_the_pgqueuer_yardstick_runs_every_job_both_ways(empty_database: str) -> None:
    figures = await measure_pgqueuer(empty_database, 300, callers=8)

    assert figures.jobs == 300
    assert figures.enqueued_per_s > 0
    assert figures.completed_per_s > 0
    assert figures.drained_per_s > 0
    connection = await asyncpg.connect(empty_database)
    try:
        # Every job of both runs went through the queue and left it.
        assert await connection.fetchval("SELECT count(*) FROM pgqueuer") == 0
        assert await connection.fetchval("SELECT count(*) FROM pgqueuer_log") > 0
    finally:
        await connection.close()
