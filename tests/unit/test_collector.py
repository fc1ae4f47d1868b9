"""The garbage collector tuning the services apply once started (services/collector.py)."""

from __future__ import annotations

import subprocess
import sys

# In a process of its own: a frozen heap is never collected again, which
# the test process (whose fixtures make cycles) must not inherit.
_PROBE = """
import gc
from services import collector
frozen_before = gc.get_freeze_count()
collector.tune_for_service()
print(gc.get_threshold(), frozen_before == 0 and gc.get_freeze_count() > 0)
"""


def test_the_services_collect_ten_times_less_often_and_skip_their_start_up_heap() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "(10000, 10, 10) True"
