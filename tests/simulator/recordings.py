"""Reads the `.http` and `.jsonl` files recorded from a real ComfyUI.

The recordings are copied from `../shared/comfyui/` into the repository so the
suite runs from a clean clone; their README says how they were made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORDINGS = Path(__file__).resolve().parent / "comfyui_recordings"


@dataclass
class Exchange:
    method: str
    path: str
    request_body: bytes
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(name: str) -> Exchange:
    text = (RECORDINGS / name).read_bytes()
    request = text.split(b"=== REQUEST (verbatim) ===\n", 1)[1]
    request, response = request.split(b"=== RESPONSE (verbatim) ===\n", 1)
    response = response.split(b"\n=== RESPONSE BODY", 1)[0]
    request_head, _, request_body = request.partition(b"\r\n\r\n")
    method, path, _version = request_head.decode().splitlines()[0].split(" ", 2)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().splitlines()
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Exchange(
        method, path, request_body.removesuffix(b"\n"), status, headers, body.removesuffix(b"\n")
    )


def websocket_texts(name: str) -> list[str]:
    """The text frames the server sent, in order, as they came on the wire."""
    texts = []
    for line in (RECORDINGS / name).read_text().splitlines():
        entry = json.loads(line)
        if entry["dir"] == "server->client" and entry["kind"] == "text":
            texts.append(entry["text"])
    return texts


def websocket_frames(name: str) -> list[dict[str, Any]]:
    """The JSON text frames the server sent, in order."""
    return [json.loads(text) for text in websocket_texts(name)]
