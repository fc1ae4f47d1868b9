"""A prompt's history entry, rebuilt from the frames ComfyUI sent while it ran.

ComfyUI tells the prompt's client everything its history entry will hold: the
run's start, the nodes its cache served, each output node's output
(`executed`, for cached output nodes too) and the success. When all of it came
over one socket connection, which delivers in order and drops nothing while it
stays open, the entry is known without asking ComfyUI for it. Anything else (a
failure, an interrupt, a socket that reopened meanwhile, a start never seen)
leaves the prompt to be read from /history or /api/jobs as before.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

JsonDict = dict[str, Any]
# Runs followed at once, past which the oldest (whose end never came) is forgotten.
RUNS_KEPT = 256


@dataclass
class _Run:
    connection: int
    messages: list[list[Any]]
    outputs: JsonDict = field(default_factory=dict)
    succeeded: bool = False

    def entry(self) -> JsonDict:
        """In /history/{id}'s shape, as far as the executor reads it."""
        return {
            "outputs": self.outputs,
            "status": {"status_str": "success", "completed": True, "messages": self.messages},
        }


class Witness:
    """Runs of prompts as their frames arrive, per socket connection."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, _Run] = OrderedDict()

    def saw(self, kind: Any, prompt_id: str, data: JsonDict, connection: int) -> JsonDict | None:
        """Record one frame of a prompt; at a prompt's end (`executing` of no node), its
        history entry when the frames told all of it on this connection."""
        if kind == "execution_start":
            self._runs[prompt_id] = _Run(connection, [[kind, data]])
            while len(self._runs) > RUNS_KEPT:
                self._runs.popitem(last=False)
            return None
        run = self._runs.get(prompt_id)
        if run is None:
            return None
        if run.connection != connection or kind in ("execution_error", "execution_interrupted"):
            del self._runs[prompt_id]
        elif kind == "execution_cached":
            run.messages.append([kind, data])
        elif kind == "executed" and data.get("output") is not None:
            # History keeps only nodes with an output, keyed as the frame names them.
            run.outputs[str(data.get("node"))] = data["output"]
        elif kind == "execution_success":
            run.messages.append([kind, data])
            run.succeeded = True
        elif kind == "executing" and data.get("node") is None:
            del self._runs[prompt_id]
            return run.entry() if run.succeeded else None
        return None
