"""`make bench`: every scenario against the simulator and a real PostgreSQL.

Prints a table and writes bench/results/latest.json. `--quick` runs a reduced
version of issue 7's scenarios and of the quick fault ones (well under two
minutes; the soak and the long-transaction comparison need the full run);
`--only NAME` runs one scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil

from bench import faults, scenarios
from bench.results import Report
from bench.scenarios import Bench
from services.embedded_postgres import postgres_server
from services.log import configure_logging

# Issue 7's figures, then issue 8's (failover, cancel, long transaction, soak).
SCENARIOS = {**scenarios.SCENARIOS, **faults.SCENARIOS}


# Each scenario starts on a quiet machine: the one before it leaves processes
# exiting and a database being dropped for a few seconds, and an image
# measured in that wake measured the wake (the image path after fan-out:
# 142-148 MB/s, against 198-224 alone).
QUIET_CPU_PCT = 20.0
SETTLE_AT_MOST_S = 15.0


def settle() -> None:
    """Until the machine's CPU is under QUIET_CPU_PCT busy over half a second."""
    deadline = time.monotonic() + SETTLE_AT_MOST_S
    while psutil.cpu_percent(interval=0.5) > QUIET_CPU_PCT and time.monotonic() < deadline:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--output", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    report = Report(quick=args.quick)
    failed = []
    with postgres_server() as server, tempfile.TemporaryDirectory(prefix="lockn-bench-") as work:
        bench = Bench(server, args.quick, Path(work), report)
        default = [n for n in SCENARIOS if not (args.quick and n in faults.FULL_RUN_ONLY)]
        for name in args.only or default:
            print(f"--> {name}", flush=True)
            settle()
            try:
                with report.scenario(name):
                    asyncio.run(SCENARIOS[name](bench))
            except Exception:
                traceback.print_exc()
                failed.append(name)
            print(
                f"    {name}: {report.durations[name]:.1f} s,"
                f" host steal {report.steal_pct[name]:.1f}%",
                flush=True,
            )
    report.print()
    print(f"written: {report.write(args.output) if args.output else report.write()}")
    print(f"took {time.time() - report.started:.0f} s")
    if failed:
        print(f"failed scenarios: {', '.join(failed)}", file=sys.stderr)
        return 1
    if not args.only and report.missing():
        print(f"figures missing: {', '.join(report.missing())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
