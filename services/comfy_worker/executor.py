"""Runs one job on ComfyUI and tells what happens, as ExecutionEvents.

The prompt_id is derived from the job id, so a job sent again (the worker or
the dispatcher restarted) finds the prompt it already queued and follows it
instead of running it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from services.comfy_worker import classify
from services.comfy_worker.comfyui import (
    ComfyUIClient,
    ComfyUIRejected,
    ComfyUIUnreachable,
    ImageRef,
    JobState,
    PromptRejected,
    output_images,
)
from services.comfy_worker.tracker import HISTORY, LOST, PromptStream, Tracker
from services.contracts import worker
from services.errors import Reason
from services.log import get_logger

log = get_logger(component="executor")
JsonDict = dict[str, Any]
PROMPT_NAMESPACE = uuid.UUID("0b4c61f2-2f57-4d0e-a0b4-5c1a2d9b7e11")
IMAGE_LOADERS = {"LoadImage", "LoadImageMask"}
CHUNK_BYTES = 1 << 20
UPLOAD_NAME_MAX = 128
MAX_ALIASES = 10_000
# Accepted.queue_position when the caller did not ask for it (a /queue read).
POSITION_NOT_READ = -1
Event = worker.ExecutionEvent


def prompt_id_for(job_id: str) -> str:
    """The ComfyUI prompt_id of a job: the same job always gets the same one."""
    return str(uuid.uuid5(PROMPT_NAMESPACE, job_id))


class Executor:
    def __init__(self, client: ComfyUIClient, tracker: Tracker, default_timeout: float) -> None:
        self.client = client
        self.tracker = tracker
        self.default_timeout = default_timeout
        self.in_flight: set[str] = set()
        self._cancelled: set[str] = set()
        # Our prompt_id -> the one ComfyUI assigned, when it ignored ours.
        self._aliases: dict[str, str] = {}

    async def execute(self, request: worker.ExecuteRequest) -> AsyncIterator[Event]:
        prompt_id = prompt_id_for(request.job_id)
        log.info("job_received", job_id=request.job_id, prompt_id=prompt_id)
        if request.comfyui_prompt_id and request.comfyui_prompt_id != prompt_id:
            # An earlier attempt learnt ComfyUI's own id: this worker may be new.
            self._adopt(prompt_id, request.comfyui_prompt_id)
        try:
            actual, number, position = await self._submit(request, prompt_id)
        except PromptRejected as rejected:
            yield _event(failed=classify.rejected_prompt(prompt_id, rejected.body))
            return
        except ComfyUIUnreachable as error:
            yield _event(failed=_unreachable(prompt_id, error))
            return
        except (ComfyUIRejected, ValueError) as error:
            yield _event(failed=classify.failed(prompt_id, Reason.INVALID_WORKFLOW, str(error)))
            return
        yield _event(
            accepted=worker.Accepted(
                prompt_id=prompt_id,
                number=number,
                queue_position=position,
                comfyui_prompt_id=actual,
            )
        )
        # Frames sent before this point wait in the tracker's early buffer.
        with self.tracker.follow(actual) as stream:
            if number < 0:
                # Queued before (this job was sent again): it may have finished.
                await self._reconcile_until_known(actual)
            async for event in self._follow(stream, request.timeout_seconds):
                yield event

    async def _submit(self, request: worker.ExecuteRequest, prompt_id: str) -> tuple[str, int, int]:
        """(ComfyUI's prompt_id, queue number or -1 when queued before, position)."""
        known = None if request.first_send else await self._known_position(prompt_id)
        if known is not None:
            return self._aliases.get(prompt_id, prompt_id), -1, known
        graph = await self._with_inputs(request, prompt_id)
        accepted = await self.client.queue_prompt(graph, self.tracker.client_id, prompt_id)
        if accepted.prompt_id != prompt_id:
            log.warning("comfyui_assigned_prompt_id", ours=prompt_id, theirs=accepted.prompt_id)
            self._adopt(prompt_id, accepted.prompt_id)
        if not request.report_queue_position:
            return accepted.prompt_id, accepted.number, POSITION_NOT_READ
        return accepted.prompt_id, accepted.number, await self._position(accepted.prompt_id)

    async def attach(self, request: worker.AttachRequest) -> AsyncIterator[Event]:
        prompt_id = request.prompt_id
        with self.tracker.follow(prompt_id) as stream:
            try:
                await self.tracker.reconcile(prompt_id)
            except ComfyUIUnreachable as error:
                yield _event(failed=_unreachable(prompt_id, error))
                return
            async for event in self._follow(stream, request.timeout_seconds):
                yield event

    async def cancel(self, prompt_id: str) -> worker.CancelOutcome.ValueType:
        """Deletes a waiting prompt, interrupts a running one. ComfyUI has no
        per-job cancel route (through 0.15 at least), so the jobs API only
        replaces the /queue read that tells the two apart."""
        prompt_id = self._aliases.get(prompt_id, prompt_id)
        state = await self._queued_state(prompt_id)
        if state is JobState.PENDING:
            self._cancelled.add(prompt_id)
            await self.client.delete([prompt_id])
            # A deleted prompt sends nothing more: end its stream ourselves.
            await self.tracker.reconcile(prompt_id)
            return worker.CANCEL_OUTCOME_DELETED
        if state is JobState.RUNNING:
            self._cancelled.add(prompt_id)
            await self.client.interrupt(prompt_id)
            return worker.CANCEL_OUTCOME_INTERRUPTED
        return worker.CANCEL_OUTCOME_NOT_FOUND

    async def _queued_state(self, prompt_id: str) -> JobState:
        """PENDING or RUNNING while in ComfyUI's queue, else UNKNOWN (finished or absent)."""
        if await self.client.has_jobs_api():
            state = (await self.client.job(prompt_id)).state
            return state if state in (JobState.PENDING, JobState.RUNNING) else JobState.UNKNOWN
        queue = await self.client.queue()
        if prompt_id in queue.pending:
            return JobState.PENDING
        return JobState.RUNNING if prompt_id in queue.running else JobState.UNKNOWN

    # ----- following a prompt ------------------------------------------------------

    def _adopt(self, ours: str, theirs: str) -> None:
        """ComfyUI ignored our prompt_id (releases before client-chosen ids):
        follow and cancel by its own. Accepted reports it, so the caller can
        send it back (ExecuteRequest.comfyui_prompt_id) to a restarted worker."""
        self._aliases[ours] = theirs
        while len(self._aliases) > MAX_ALIASES:
            self._aliases.pop(next(iter(self._aliases)))

    async def _known_position(self, prompt_id: str) -> int | None:
        """Where ComfyUI has this prompt already (queued or finished), else None."""
        prompt_id = self._aliases.get(prompt_id, prompt_id)
        if await self.client.has_jobs_api():
            state = (await self.client.job(prompt_id)).state
            if state is JobState.PENDING:
                return await self._position(prompt_id)
            return None if state is JobState.UNKNOWN else 0
        queue = await self.client.queue()
        position = queue.position(prompt_id)
        if position is not None:
            return position
        if await self.client.history(prompt_id) is not None:
            return 0
        return None

    async def _position(self, prompt_id: str) -> int:
        """Where a queued prompt waits (0 once it runs or finished). /queue answers
        in one read on every release; a single job from /api/jobs does not say."""
        return (await self.client.queue()).position(prompt_id) or 0

    async def _follow(self, stream: PromptStream, timeout_seconds: int) -> AsyncIterator[Event]:
        prompt_id = stream.prompt_id
        timeout = float(timeout_seconds or self.default_timeout)
        deadline = time.monotonic() + timeout
        self.in_flight.add(prompt_id)
        started = False
        try:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        message = await stream.get()
                except TimeoutError:
                    yield _event(failed=await self._timed_out(prompt_id, timeout))
                    return
                kind, data = message["type"], message.get("data") or {}
                if kind == "execution_start" and not started:
                    started = True
                    yield _event(started=worker.Started(prompt_id=prompt_id))
                elif kind == "progress":
                    if not started:
                        started = True
                        yield _event(started=worker.Started(prompt_id=prompt_id))
                    yield _event(
                        progress=worker.Progress(
                            prompt_id=prompt_id,
                            node_id=str(data.get("node", "")),
                            value=int(data.get("value", 0)),
                            max=int(data.get("max", 0)),
                        )
                    )
                elif kind == "executing" and data.get("node") is None:
                    # The only message after history is written: read the outcome there.
                    await self._reconcile_until_known(prompt_id)
                elif kind == LOST:
                    yield _event(failed=self._lost(prompt_id))
                    return
                elif kind == HISTORY:
                    async for event in self._finish(prompt_id, data):
                        yield event
                    return
        except ComfyUIUnreachable as error:
            yield _event(failed=_unreachable(prompt_id, error))
        finally:
            self.in_flight.discard(prompt_id)
            self._cancelled.discard(prompt_id)

    async def _reconcile_until_known(self, prompt_id: str) -> None:
        # When ComfyUI does not answer, the tracker's own reconciliation finds it later.
        with contextlib.suppress(ComfyUIUnreachable):
            await self.tracker.reconcile(prompt_id)

    def _lost(self, prompt_id: str) -> worker.Failed:
        if prompt_id in self._cancelled:
            return classify.failed(prompt_id, Reason.INTERRUPTED, "deleted from ComfyUI's queue")
        return classify.failed(
            prompt_id,
            Reason.PROMPT_LOST,
            "ComfyUI no longer knows this prompt (restarted?)",
            retryable=True,
        )

    async def _timed_out(self, prompt_id: str, timeout: float) -> worker.Failed:
        with contextlib.suppress(ComfyUIUnreachable, ComfyUIRejected):
            await self.client.delete([prompt_id])
            await self.client.interrupt(prompt_id)
        return classify.failed(
            prompt_id, Reason.TIMEOUT, f"no completion within {timeout:g} s; prompt cancelled"
        )

    async def _finish(self, prompt_id: str, entry: JsonDict) -> AsyncIterator[Event]:
        failure = classify.from_history(prompt_id, entry)
        if failure is not None:
            if failure.reason == Reason.GPU_OUT_OF_MEMORY.value:
                with contextlib.suppress(ComfyUIUnreachable, ComfyUIRejected):
                    await self.client.free()
            yield _event(failed=failure)
            return
        images = output_images(entry)
        for index, image in enumerate(images):
            content_type, size, chunks = await self.client.view(image, CHUNK_BYTES)
            # One chunk behind, so that the last one with data says it is the
            # last: an image of one chunk (most are) is one message, not two.
            offset, held = 0, b""
            async for data in chunks:
                if held:
                    yield _chunk(prompt_id, index, image, content_type, size, offset, held)
                    offset += len(held)
                held = data
            total = offset + len(held)
            yield _chunk(prompt_id, index, image, content_type, total, offset, held, last=True)
        yield _event(
            completed=worker.Completed(
                prompt_id=prompt_id, output_count=len(images), cached=_all_cached(entry)
            )
        )

    # ----- inputs ---------------------------------------------------------------------

    async def _with_inputs(self, request: worker.ExecuteRequest, prompt_id: str) -> JsonDict:
        """The graph, with each caller image uploaded and its loader pointed at it."""
        try:
            graph = json.loads(request.graph_json)
        except RecursionError:
            raise ValueError("graph_json nests too deeply") from None
        # Checked before any upload: nodes are what the loaders below look into.
        if not isinstance(graph, dict) or not all(isinstance(n, dict) for n in graph.values()):
            raise ValueError("graph_json is not a JSON object of nodes")
        uploaded: dict[str, str] = {}
        for image in request.input_images:
            uploaded[image.name] = await self.client.upload_image(
                upload_name(prompt_id, image.name), image.data
            )
        return _point_loaders(graph, uploaded) if uploaded else graph


def upload_name(prompt_id: str, name: str) -> str:
    """The file name an input image gets in ComfyUI's input folder: only safe
    characters, and short enough for any file system (255 bytes) however long
    the caller's name; a long name keeps its end (the extension) and a digest."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if len(safe) > UPLOAD_NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        safe = f"{digest}-{safe[-UPLOAD_NAME_MAX // 2 :]}"
    return f"lockn-{prompt_id[:8]}-{safe}"


def _point_loaders(graph: JsonDict, uploaded: Mapping[str, str]) -> JsonDict:
    for node in graph.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        if node.get("class_type") in IMAGE_LOADERS and inputs.get("image") in uploaded:
            inputs["image"] = uploaded[inputs["image"]]
    return graph


def _all_cached(entry: JsonDict) -> bool:
    """Every output node came from ComfyUI's cache, so nothing ran: a node runs
    again only when something above it changed, and so does everything below
    it, down to the outputs. Read from the outputs, which an entry rebuilt from
    the frames has too, rather than from the graph, which only /history's has."""
    outputs = entry.get("outputs") or {}
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind == "execution_cached":
            return bool(outputs) and set(data.get("nodes", [])) >= set(outputs)
    return False


def _unreachable(prompt_id: str, error: Exception) -> worker.Failed:
    return classify.failed(
        prompt_id, Reason.COMFYUI_UNREACHABLE, f"ComfyUI unreachable: {error}", retryable=True
    )


def _event(**kind: Any) -> Event:
    return Event(**kind)


def _chunk(
    prompt_id: str,
    index: int,
    image: ImageRef,
    content_type: str,
    size: int,
    offset: int,
    data: bytes,
    last: bool = False,
) -> Event:
    """Filled in place: a submessage given to a constructor is copied through
    serialize and parse, two more copies of every megabyte of image."""
    event = Event()
    chunk = event.output
    chunk.prompt_id = prompt_id
    chunk.index = index
    chunk.node_id = image.node_id
    chunk.filename = image.filename
    chunk.content_type = content_type
    chunk.size_bytes = size
    chunk.offset = offset
    chunk.data = data
    chunk.last = last
    return event
