"""A prompt's history entry rebuilt from its frames, held to what a real
ComfyUI answered on /history/{id} for the same runs (a fresh run, one served
from the cache, a text-to-image run); anything less than a whole successful
run on one connection is left to /history."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.comfy_worker import classify
from services.comfy_worker.comfyui import output_images
from services.comfy_worker.executor import _all_cached
from services.comfy_worker.tracker import HISTORY, Tracker
from services.comfy_worker.witness import Witness
from tests.simulator.recordings import exchange, websocket_texts
from tests.unit.test_tracker_routing import drained, prompt_of

RECORDED_RUNS = [
    ("20-ws-run-emptyimage-saveimage.jsonl", "02-history-finished.http"),
    ("21-ws-run-cached.jsonl", "02b-history-cached-run.http"),
    ("53-ws-t2i-cold.jsonl", "54-history-t2i-cold.http"),
]


@pytest.mark.parametrize(("frames_file", "history_file"), RECORDED_RUNS)
def test_the_entry_from_the_frames_reads_as_comfyuis_history(
    tracker: Tracker, frames_file: str, history_file: str
) -> None:
    frames = websocket_texts(frames_file)
    prompt_id = prompt_of(frames)
    recorded = exchange(history_file).json()[prompt_id]

    end = drained(tracker, prompt_id, frames)[-1]

    assert end["type"] == HISTORY
    entry: Any = end["data"]
    assert entry["outputs"] == recorded["outputs"]
    assert classify.from_history(prompt_id, entry) is None
    assert output_images(entry) == output_images(recorded)
    assert _all_cached(entry) == _all_cached(recorded)


def test_the_recordings_hold_a_fresh_run_and_a_cached_one() -> None:
    cached = [
        _all_cached(exchange(h).json()[prompt_of(websocket_texts(f))]) for f, h in RECORDED_RUNS
    ]
    assert cached == [False, True, False]


def test_a_failed_run_ends_as_comfyui_sent_it_so_history_is_read(tracker: Tracker) -> None:
    frames = websocket_texts("26-ws-runtime-error.jsonl")
    prompt_id = prompt_of(frames)
    assert any(json.loads(t)["type"] == "execution_error" for t in frames)

    end = drained(tracker, prompt_id, frames)[-1]

    assert end == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}


@pytest.mark.parametrize("version", ["0.2.7", "", "unknown"])
def test_a_release_older_than_the_recorded_one_is_read_from_history(
    tracker: Tracker, version: str
) -> None:
    # Before ComfyUI's execution rewrite, a cached output node sent no
    # `executed`: its frames would miss that node's images.
    tracker.client.know_version(version)
    frames = websocket_texts("21-ws-run-cached.jsonl")
    prompt_id = prompt_of(frames)

    end = drained(tracker, prompt_id, frames)[-1]

    assert end == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}


def frames_of(name: str) -> list[tuple[str, dict[str, Any]]]:
    parsed = [json.loads(text) for text in websocket_texts(name)]
    return [(m["type"], m["data"]) for m in parsed if isinstance(m.get("data"), dict)]


def test_a_socket_reopened_during_the_run_leaves_the_entry_to_history() -> None:
    frames = frames_of("20-ws-run-emptyimage-saveimage.jsonl")
    prompt_id = prompt_of(websocket_texts("20-ws-run-emptyimage-saveimage.jsonl"))
    start = [kind for kind, _ in frames].index("execution_start")
    witness = Witness()
    ends = []
    for n, (kind, data) in enumerate(frames):
        # Frames after the start came on a new connection: some may be lost.
        ends.append(witness.saw(kind, prompt_id, data, connection=1 if n <= start else 2))
    assert start < len(frames) - 1 and ends == [None] * len(frames)


def test_a_run_whose_start_was_not_seen_leaves_the_entry_to_history() -> None:
    frames = frames_of("20-ws-run-emptyimage-saveimage.jsonl")
    prompt_id = prompt_of(websocket_texts("20-ws-run-emptyimage-saveimage.jsonl"))
    witness = Witness()
    ends = [witness.saw(k, prompt_id, d, 1) for k, d in frames if k != "execution_start"]
    assert ends == [None] * len(ends)
    whole = [witness.saw(k, prompt_id, d, 1) for k, d in frames]
    assert whole[-1] is not None  # the same frames with their start do make one
