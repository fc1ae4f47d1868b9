"""Which of ComfyUI's frames reach a followed prompt's stream, replayed from a
run recorded on a real ComfyUI: the ones the executor acts on, in order; the
rest (progress_state above all) only show the prompt is alive."""

from __future__ import annotations

import json
import time

import pytest

from services.comfy_worker.tracker import HISTORY, Tracker
from tests.simulator.recordings import websocket_texts


def prompt_of(frames: list[str]) -> str:
    for text in frames:
        data = json.loads(text).get("data")
        if isinstance(data, dict) and isinstance(data.get("prompt_id"), str):
            return str(data["prompt_id"])
    raise AssertionError("the recording names no prompt")


def drained(tracker: Tracker, prompt_id: str, frames: list[str]) -> list[dict[str, object]]:
    with tracker.follow(prompt_id) as stream:
        for text in frames:
            tracker.on_text(text)
        delivered = []
        while not stream.messages.empty():
            delivered.append(stream.messages.get_nowait())
    return delivered


def test_a_followed_prompt_gets_its_start_steps_and_end_in_order(tracker: Tracker) -> None:
    frames = websocket_texts("56-ws-t2i-warm.jsonl")
    prompt_id = prompt_of(frames)
    kinds = [json.loads(t)["type"] for t in frames]
    # The recording holds what is to be left out.
    assert {"progress_state", "executed", "execution_success"} <= set(kinds)
    assert kinds.count("executing") > 1

    delivered = drained(tracker, prompt_id, frames)

    steps = [json.loads(t) for t in frames if json.loads(t)["type"] == "progress"]
    assert len(steps) > 1
    assert delivered[0]["type"] == "execution_start"
    assert delivered[1:-1] == steps
    # Its end, told in full on one connection, comes as its history entry.
    assert delivered[-1]["type"] == HISTORY


def test_progress_state_is_dropped_unparsed(
    tracker: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = websocket_texts("56-ws-t2i-warm.jsonl")
    prompt_id = prompt_of(frames)
    parsed: list[str] = []
    real_loads = json.loads

    def loads(text: str) -> object:
        parsed.append(text)
        return real_loads(text)

    monkeypatch.setattr("services.comfy_worker.tracker.json.loads", loads)

    drained(tracker, prompt_id, frames)

    assert parsed and not [t for t in parsed if '"progress_state"' in t]
    assert len(parsed) == len([t for t in frames if '"type": "progress_state"' not in t])


def test_a_frame_not_delivered_still_counts_as_heard(tracker: Tracker) -> None:
    prompt_id = "9f1c0d6e-0000-4000-8000-000000000001"
    executed = {"type": "executed", "data": {"node": "9", "output": {}, "prompt_id": prompt_id}}
    with tracker.follow(prompt_id) as stream:
        stream.heard = time.monotonic() - 100
        tracker.on_text(json.dumps(executed))
        assert stream.messages.empty()
        assert time.monotonic() - stream.heard < 5


def test_frames_before_the_prompt_is_followed_wait_only_when_the_executor_reads_them(
    tracker: Tracker,
) -> None:
    prompt_id = "9f1c0d6e-0000-4000-8000-000000000002"
    start = {"type": "execution_start", "data": {"prompt_id": prompt_id, "timestamp": 1}}
    cached = {"type": "execution_cached", "data": {"nodes": [], "prompt_id": prompt_id}}
    for message in (start, cached):
        tracker.on_text(json.dumps(message))

    delivered = drained(tracker, prompt_id, [])

    assert delivered == [start]
