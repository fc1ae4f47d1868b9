"""One /ws connection per worker, routing ComfyUI's messages to the prompts
being followed, so completion is pushed, not polled.

ComfyUI drops frames sent while a socket is down, and sends a prompt's
frames only to the clientId that queued it. So the clientId is stable across
restarts of the same worker, and whenever the socket (re)opens, every
PollIntervalMs while none can be opened, and for any prompt quiet for a
PollIntervalMs (queued by an earlier socket), each prompt being followed is
reconciled with /api/jobs/{id} (on releases without it, /history/{id} and
/queue): a prompt that finished meanwhile gets its history entry, one ComfyUI
no longer knows (a restart lost it) is reported lost. Nothing waits forever.
A run whose frames all came on one connection needs none of that: its end
comes with the history entry the frames make (witness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import aiohttp

from services import metrics
from services.comfy_worker.comfyui import (
    UNKNOWN_JOB,
    ComfyUIClient,
    ComfyUIUnreachable,
    Job,
    JobState,
)
from services.comfy_worker.witness import Witness
from services.log import get_logger

log = get_logger(component="comfyui_ws")
JsonDict = dict[str, Any]
# Synthetic messages the tracker adds to a prompt's stream.
HISTORY = "lockn.history"  # data: the history entry (the prompt is finished)
LOST = "lockn.lost"  # ComfyUI knows nothing of the prompt
EARLY_PROMPTS = 256
# progress_state repeats every node's state on each change: most of a prompt's
# frames and bytes, and nothing the executor reads. ComfyUI writes "type" first
# (json.dumps of {"type": ..., "data": ...}), so the frame is dropped unparsed.
UNREAD_PREFIXES = ('{"type": "progress_state"',)


class PromptStream:
    """The messages of one prompt, in the order ComfyUI sent them."""

    def __init__(self, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        self.messages: asyncio.Queue[JsonDict] = asyncio.Queue()
        self.heard = time.monotonic()

    def put(self, kind: str, data: Any) -> None:
        self.deliver({"type": kind, "data": data})

    def deliver(self, message: JsonDict) -> None:
        self.heard = time.monotonic()
        self.messages.put_nowait(message)

    async def get(self) -> JsonDict:
        return await self.messages.get()


class Tracker:
    def __init__(
        self,
        client: ComfyUIClient,
        *,
        client_id: str | None = None,
        poll_interval: float = 2.0,
        reconnect_max: float = 5.0,
    ) -> None:
        self.client = client
        self.client_id = client_id or f"lockn-{uuid.uuid4().hex}"
        self.poll_interval = poll_interval
        self.reconnect_max = reconnect_max
        self.connected = asyncio.Event()
        self._streams: dict[str, PromptStream] = {}
        # Messages for prompts not followed yet (a stream opened after POST /prompt).
        self._early: OrderedDict[str, list[JsonDict]] = OrderedDict()
        # Which socket connection a frame came on: a run told on one is told in full.
        self._connection = 0
        self._witness = Witness()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="comfyui-websocket"),
            asyncio.create_task(self._poll_quiet(), name="comfyui-quiet-prompts"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.contextmanager
    def follow(self, prompt_id: str) -> Iterator[PromptStream]:
        stream = PromptStream(prompt_id)
        self._streams[prompt_id] = stream
        for message in self._early.pop(prompt_id, []):
            stream.deliver(message)
        try:
            yield stream
        finally:
            if self._streams.get(prompt_id) is stream:
                del self._streams[prompt_id]

    @property
    def followed(self) -> list[str]:
        return list(self._streams)

    async def reconcile(self, prompt_id: str) -> None:
        """Ask ComfyUI where `prompt_id` is; finished or lost ends its stream."""
        stream = self._streams.get(prompt_id)
        if stream is None:
            return
        stream.heard = time.monotonic()
        job = await self._locate(prompt_id)
        if job.state is JobState.FINISHED:
            stream.put(HISTORY, job.entry)
        elif job.state is JobState.UNKNOWN:
            stream.put(LOST, {"prompt_id": prompt_id})

    async def _locate(self, prompt_id: str) -> Job:
        if await self.client.has_jobs_api():
            # One read: ComfyUI looks in its queue, then its history, so a prompt
            # finishing meanwhile is found in one or the other.
            return await self.client.job(prompt_id)
        entry = await self.client.history(prompt_id)
        if entry is None:
            if (await self.client.queue()).position(prompt_id) is not None:
                return Job(JobState.RUNNING)
            # It may have finished between the two reads.
            entry = await self.client.history(prompt_id)
        return Job(JobState.FINISHED, entry=entry) if entry is not None else UNKNOWN_JOB

    async def reconcile_all(self) -> None:
        for prompt_id in self.followed:
            try:
                await self.reconcile(prompt_id)
            except ComfyUIUnreachable:
                return

    async def _poll_quiet(self) -> None:
        """Reconcile prompts that sent nothing for a poll interval: their frames
        may go to a socket that no longer exists (a worker restart)."""
        while True:
            await asyncio.sleep(self.poll_interval)
            if not self.connected.is_set():
                continue  # _run polls everything while the socket is down
            now = time.monotonic()
            for prompt_id in self.followed:
                stream = self._streams.get(prompt_id)
                if stream is not None and now - stream.heard >= self.poll_interval:
                    with contextlib.suppress(ComfyUIUnreachable):
                        await self.reconcile(prompt_id)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._connect_and_read()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any socket failure: reconnect, never give up
                log.warning("comfyui_ws_down", error=str(error) or type(error).__name__)
            self.connected.clear()
            metrics.COMFYUI_WS_RECONNECTS.inc()
            # While down, the fallback is polling: every prompt is reconciled.
            await self.reconcile_all()
            await asyncio.sleep(min(delay, self.poll_interval))
            delay = min(delay * 2, self.reconnect_max)

    async def _connect_and_read(self) -> None:
        url = self.client.websocket_url(self.client_id)
        async with self.client.session.ws_connect(url, heartbeat=20, max_msg_size=0) as ws:
            self._connection += 1
            self.connected.set()
            log.info("comfyui_ws_connected", client_id=self.client_id)
            # The socket drops when ComfyUI restarts, maybe as another release,
            # and what its frames hold depends on which.
            self.client.forget_server()
            with contextlib.suppress(ComfyUIUnreachable):
                await self.client.learn_version()
            await ws.send_json({"type": "feature_flags", "data": {}})
            # Frames of the downtime are lost: catch up on every followed prompt.
            await self.reconcile_all()
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.on_text(message.data)
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
                # Binary frames are previews: not our outputs, which come from /view.

    def on_text(self, text: str) -> None:
        """One text frame from ComfyUI's socket, to the stream of its prompt."""
        if not text.startswith(UNREAD_PREFIXES):
            self._route(json.loads(text))

    def _route(self, message: JsonDict) -> None:
        data = message.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("prompt_id"), str):
            return  # `status` and other broadcasts
        prompt_id: str = data["prompt_id"]
        entry = self._witness.saw(message.get("type"), prompt_id, data, self._connection)
        if entry is not None and self.client.frames_hold_outputs:
            # A run its frames told in full ends with its entry: ComfyUI is not asked.
            message = {"type": HISTORY, "data": entry}
        followed = read_by_executor(message.get("type"), data)
        stream = self._streams.get(prompt_id)
        if stream is not None:
            if followed:
                stream.deliver(message)
            else:
                stream.heard = time.monotonic()
            return
        if not followed:
            return
        self._early.setdefault(prompt_id, []).append(message)
        while len(self._early) > EARLY_PROMPTS:
            self._early.popitem(last=False)


def read_by_executor(kind: Any, data: JsonDict) -> bool:
    """The frames the executor acts on: a prompt's start, its steps and its
    end (`executing` of no node, or the entry its frames made). The others (a
    node starting, a node's output, cached nodes...) only show that the
    prompt is alive."""
    if kind == "executing":
        return data.get("node") is None
    return kind in ("execution_start", "progress", HISTORY)
