"""`make help` and the README name every target a user runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Steps the other targets run for themselves.
INTERNAL = {"help", "venv", "proto-check"}


def user_targets() -> set[str]:
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert phony is not None
    return set(phony[1].split()) - INTERNAL


def test_make_help_lists_every_target_a_user_runs() -> None:
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
    ).stdout
    listed = set(re.findall(r"^make (\S+)", shown, re.M))
    assert listed == user_targets()


def test_the_readme_names_every_target() -> None:
    readme = (REPO / "README.md").read_text()
    targets = re.search(r"^Targets \(`make help`\):(.*?)\n\n", readme, re.M | re.S)
    assert targets is not None
    assert set(re.findall(r"`([a-z-]+)`", targets[1])) == user_targets()
