"""The LOC-58 note's design, as a baseline to measure against.

A background worker polls the database every 5 s for queued generations and
takes them one at a time; each is POSTed to ComfyUI's /prompt, then
/history/{id} is polled every 2 s until it appears, the image is downloaded
and saved, and the row marked complete. Nothing is queued ahead in ComfyUI,
so the GPU idles between jobs. It is written as that note describes it, as
kindly as the description allows: the queue is drained without sleeping while
work remains, and the 5 s sleep happens only when the queue is empty.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

DB_POLL_SECONDS = 5.0
HISTORY_POLL_SECONDS = 2.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS loc58_generations (
    id uuid PRIMARY KEY,
    status text NOT NULL DEFAULT 'Queued',
    workflow text NOT NULL,
    output_path text,
    created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
)
"""
INSERT = "INSERT INTO loc58_generations (id, workflow) VALUES ($1, $2)"
CLAIM = """
UPDATE loc58_generations SET status = 'Processing'
WHERE id = (SELECT id FROM loc58_generations WHERE status = 'Queued'
            ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, workflow
"""
COMPLETE = """
UPDATE loc58_generations SET status = 'Complete', output_path = $2, completed_at = now()
WHERE id = $1
"""
REMAINING = "SELECT count(*) FROM loc58_generations WHERE status <> 'Complete'"


async def run_baseline(
    dsn: str, comfy_url: str, graph: dict[str, Any], jobs: int, out: Path
) -> None:
    """Queue `jobs` copies of `graph` (fresh seeds) and run them the LOC-58 way to the end."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        for n in range(jobs):
            await conn.execute(INSERT, uuid.uuid4(), json.dumps(_with_seed(graph, n)))
        async with aiohttp.ClientSession(comfy_url) as http:
            while await conn.fetchval(REMAINING):
                row = await conn.fetchrow(CLAIM)
                if row is None:
                    await asyncio.sleep(DB_POLL_SECONDS)
                    continue
                path = await _generate(http, json.loads(row["workflow"]), out / f"{row['id']}.png")
                await conn.execute(COMPLETE, row["id"], str(path))
    finally:
        await conn.close()


def _with_seed(graph: dict[str, Any], seed: int) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(graph))
    for node in copy.values():
        if "seed" in node.get("inputs", {}):
            node["inputs"]["seed"] = 1000 + seed
    return copy


async def _generate(http: aiohttp.ClientSession, graph: dict[str, Any], path: Path) -> Path:
    async with http.post("/prompt", json={"prompt": graph, "client_id": "loc58"}) as reply:
        reply.raise_for_status()
        prompt_id = (await reply.json())["prompt_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        await asyncio.sleep(HISTORY_POLL_SECONDS)
        async with http.get(f"/history/{prompt_id}") as reply:
            history = await reply.json()
        if prompt_id in history:
            image = _first_image(history[prompt_id])
            async with http.get("/view", params=image) as reply:
                data = await reply.read()
            await asyncio.to_thread(path.write_bytes, data)
            return path
    raise TimeoutError(prompt_id)


def _first_image(entry: dict[str, Any]) -> dict[str, str]:
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            return {
                "filename": image["filename"],
                "subfolder": image["subfolder"],
                "type": image["type"],
            }
    raise LookupError("no image in history")
