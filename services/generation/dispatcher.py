"""Feeds the ComfyWorkers from the queue and records what they report.

Each replica claims as many rows as its workers have free slots (slots =
MaxConcurrentGenerations + lookahead, so ComfyUI's own queue already holds
the next prompt), runs each as one Execute stream, and writes every state
change fenced by the claim's attempt. Leases are renewed in one batched
statement; rows whose lease expired elsewhere are taken over and sent to the
same worker with the same job id, which follows the prompt already in
ComfyUI instead of running it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from asyncpg import Record

from services import metrics
from services.comfy_worker.executor import prompt_id_for
from services.contracts import worker
from services.errors import Reason
from services.generation.queue import TERMINAL, Fence, Queue
from services.generation.store import StorageFull, Store
from services.generation.workers import WorkerHandle, WorkerPool
from services.log import get_logger
from services.settings import QueueSettings

log = get_logger(component="dispatcher")
# How long a job waits for its worker to come back before it is re-queued.
REATTACH_SECONDS = 60.0
PRUNE_INTERVAL = 600.0
# Leases taken over per scan: more wait for the next scan, a poll interval later.
TAKEOVER_BATCH = 64
# An image is flushed to disk while it streams in, each time this much more
# arrived, so the fsync that commits it has little left to wait for.
FLUSH_BYTES = 2 << 20


class LeaseLost(Exception):
    """Another replica owns the generation now: stop writing."""


@dataclass
class _Output:
    temp: Any
    handle: BinaryIO
    content_type: str
    unflushed: int = 0
    flushing: asyncio.Future[None] | None = None


@dataclass
class Job:
    row: Record
    fence: Fence
    handle: WorkerHandle
    # Its DISPATCHED write is done: the create or the claim made it.
    dispatched: bool
    task: asyncio.Task[None] | None = None
    cancel_sent: bool = False
    # The id ComfyUI knows the prompt by (see _run); "" until the job starts.
    prompt_id: str = ""
    outputs: dict[int, _Output] = field(default_factory=dict)
    saved: list[dict[str, Any]] = field(default_factory=list)


class Dispatcher:
    def __init__(
        self, queue: Queue, workers: WorkerPool, store: Store, settings: QueueSettings
    ) -> None:
        self.queue = queue
        self.workers = workers
        self.store = store
        self.settings = settings
        self.wake = asyncio.Event()
        self.jobs: dict[uuid.UUID, Job] = {}
        self.paused: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._next_takeover_scan = 0.0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._dispatch_forever(), name="dispatch"),
            asyncio.create_task(self._heartbeat_forever(), name="heartbeat"),
            asyncio.create_task(self._prune_forever(), name="prune"),
        ]

    async def stop(self) -> None:
        """Stop claiming and let go of running jobs; their leases expire for a takeover."""
        for task in [*self._tasks, *[j.task for j in self.jobs.values() if j.task]]:
            task.cancel()
        for task in [*self._tasks, *[j.task for j in self.jobs.values() if j.task]]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def poke(self) -> None:
        self.wake.set()

    # ----- claiming ------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self._dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database is down: keep trying
                log.warning("dispatch_failed", error=str(error) or type(error).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_seconds):
                    await self.wake.wait()

    async def _dispatch_once(self) -> None:
        if self.paused and self.store.has_space():
            log.info("dispatch_resumed", was=self.paused)
            self.paused = None
        if self.paused:
            return
        if time.monotonic() >= self._next_takeover_scan:
            # Taken-over work is already on a GPU (re-attached, not re-run), so it
            # does not wait for a free slot: it fills the slot it really occupies.
            self._next_takeover_scan = time.monotonic() + self.settings.poll_seconds
            for row in await self.queue.take_over(TAKEOVER_BATCH):
                self._start(row, dispatched=False)
        while (free := self.workers.free_slots) > 0:
            # One worker free (the steady state: a job ended, its slot opened)
            # leaves no choice to make, so the claim dispatches to it as well.
            only = self.workers.sole_free()
            rows = await self.queue.claim(free, worker=only.name if only else None)
            for row in rows:
                self._start(row, dispatched=only is not None)
            if len(rows) < free:
                # The queue is empty: a row queued from now on notifies and wakes us,
                # so a second claim now would only find nothing (and delay the
                # dispatch write of the row just claimed).
                return

    def _start(self, row: Record, dispatched: bool) -> None:
        handle = self._worker_for(row)
        self.workers.acquire(handle, row["checkpoint"])
        self._launch(row, handle, None, dispatched)

    def _launch(
        self,
        row: Record,
        handle: WorkerHandle,
        inputs: Sequence[tuple[str, bytes]] | None,
        dispatched: bool,
    ) -> None:
        fence = Fence(row["id"], row["attempts"], self.queue.owner)
        job = Job(row, fence, handle, dispatched)
        self.jobs[row["id"]] = job
        job.task = asyncio.create_task(self._run(job, inputs), name=f"job-{row['id']}")

    # ----- dispatch at create ----------------------------------------------------------

    def reserve(self, checkpoint: str | None) -> WorkerHandle | None:
        """A slot for a generation being created, taken now so that its create
        can dispatch it (`Queue.create(direct_to=...)`); hand it back with
        `start_created` or `unreserve`. None while paused or with no slot free."""
        handle = None if self.paused else self.workers.pick(checkpoint)
        if handle is not None:
            self.workers.acquire(handle, checkpoint)
        return handle

    def unreserve(self, handle: WorkerHandle) -> None:
        self.workers.release(handle)

    def start_created(
        self, row: Record, handle: WorkerHandle, inputs: Sequence[tuple[str, bytes]]
    ) -> None:
        """Run a generation its create dispatched to `handle` (its reserved slot)."""
        self._launch(row, handle, inputs, dispatched=True)

    def _worker_for(self, row: Record) -> WorkerHandle:
        # A taken-over job goes back to the ComfyUI that may still be running it.
        previous = self.workers.workers.get(row["worker"] or "")
        if previous is not None and row["status"] in ("DISPATCHED", "RUNNING") and row["worker"]:
            return previous
        chosen = self.workers.pick(row["checkpoint"])
        return chosen or next(iter(self.workers.workers.values()))

    # ----- one job -------------------------------------------------------------------

    async def _run(self, job: Job, inputs: Sequence[tuple[str, bytes]] | None) -> None:
        """One job; `inputs` None: read from the queue when it has any."""
        claimed = time.monotonic()
        generation_id = job.row["id"]
        bound = log.bind(generation_id=str(generation_id), worker=job.handle.name)
        try:
            job_id = str(generation_id)
            # Derived from the id, unless an earlier attempt met a ComfyUI that
            # assigned its own: then that one, so the prompt is found again.
            job.prompt_id = job.row["prompt_id"] or prompt_id_for(job_id)
            bound = bound.bind(prompt_id=job.prompt_id)
            # Round trips on two connections at once: the input read does not
            # depend on the write, and both stand before Execute.
            steps: list[Awaitable[Any]] = []
            write = self._before_execute(job)
            if write is not None:
                steps.append(self._write(job, write))
            reading = inputs is None and job.row["has_inputs"]
            if reading:
                steps.append(self.queue.inputs(generation_id))
            done = await asyncio.gather(*steps)
            inputs = done[-1] if reading else inputs or []
            request = worker.ExecuteRequest(
                job_id=job_id,
                graph_json=job.row["graph"],
                timeout_seconds=job.row["timeout_seconds"],
                input_images=[worker.InputImage(name=name, data=data) for name, data in inputs],
                comfyui_prompt_id=job.prompt_id,
                # Attempt 1 is this claim's alone (a takeover or a retry counts
                # another): before its first Execute no ComfyUI can hold the prompt.
                first_send=job.fence.attempt == 1,
            )
            await self._execute(job, request, claimed)
        except LeaseLost:
            bound.warning("lease_lost")
        except StorageFull as error:
            self.paused = f"{Reason.STORAGE_FULL.value}: {error}"
            bound.error("storage_full", error=str(error))
            with contextlib.suppress(Exception):
                await self._finish(
                    job,
                    self.queue.failed(job.fence, Reason.STORAGE_FULL.value, str(error), {}),
                    "failed",
                    Reason.STORAGE_FULL.value,
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            bound.exception("job_crashed")
            with contextlib.suppress(Exception):
                await self._retry_or_fail(job, Reason.INTERNAL.value, "dispatcher error", True)
        finally:
            self._discard_outputs(job)
            self.jobs.pop(generation_id, None)
            self.workers.release(job.handle)

    def _before_execute(self, job: Job) -> Awaitable[Record | None] | None:
        """The write Execute must wait for, if the create or the claim did not make it."""
        if not job.dispatched:
            return self.queue.dispatched(job.fence, job.handle.name, job.prompt_id)
        if job.row["prompt_id"] is None:
            # Queued before creates kept prompt_ids: it shows the prompt it ran as.
            return self.queue.prompt_assigned(job.fence, job.prompt_id)
        return None

    async def _execute(self, job: Job, request: worker.ExecuteRequest, claimed: float) -> None:
        """Run the stream; when the worker vanishes, send the same job again until it's back."""
        gone_since: float | None = None
        while True:
            try:
                call = job.handle.stub.Execute(request, metadata=job.handle.metadata)
                async for response in call:
                    gone_since = None
                    if await self._on_event(job, response.event, claimed):
                        return
                raise ConnectionError("the stream ended before the job did")
            except (grpc.aio.AioRpcError, ConnectionError) as error:
                if isinstance(error, grpc.aio.AioRpcError) and error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL,
                ):
                    await self._retry_or_fail(
                        job, Reason.INTERNAL.value, str(error.details()), False
                    )
                    return
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > REATTACH_SECONDS:
                    await self._retry_or_fail(
                        job, Reason.COMFYUI_UNREACHABLE.value, "the worker did not come back", True
                    )
                    return
                self._discard_outputs(job)
                await asyncio.sleep(0.5)
                request = _resend(request, job.prompt_id)

    async def _on_event(self, job: Job, event: worker.ExecutionEvent, claimed: float) -> bool:
        """Record one event; True when the job is finished."""
        kind = event.WhichOneof("kind")
        if kind == "accepted":
            metrics.DISPATCH_LATENCY.observe(time.monotonic() - claimed)
            theirs = event.accepted.comfyui_prompt_id
            if theirs and theirs != job.prompt_id:
                await self._write(job, self.queue.prompt_assigned(job.fence, theirs))
                job.prompt_id = theirs
        elif kind == "started":
            row = await self._write(job, self.queue.started(job.fence))
            metrics.QUEUE_WAIT.observe(max(0.0, time.time() - row["created_at"].timestamp()))
        elif kind == "progress":
            p = event.progress
            await self._write(job, self.queue.progress(job.fence, p.value, p.max, p.node_id))
        elif kind == "output":
            await self._store_chunk(job, event.output)
        elif kind == "completed":
            await self._finish(job, self.queue.completed(job.fence, job.saved), "completed", "")
            return True
        elif kind == "failed":
            await self._on_failed(job, event.failed)
            return True
        return False

    async def _store_chunk(self, job: Job, chunk: worker.OutputChunk) -> None:
        output = job.outputs.get(chunk.index)
        if output is None and chunk.last:
            # A whole image in one chunk (most are): opened, written and made
            # durable by one thread; an open() waits behind other images'
            # fsyncs in the file system's journal, not on the event loop.
            final = self.store.path_for(job.row["id"], chunk.index, chunk.content_type)
            await asyncio.to_thread(self._save_whole, job.row["id"], chunk.index, chunk.data, final)
            _record_saved(job, chunk, final, chunk.content_type)
            return
        if output is None:
            temp, handle = self.store.open_temp(job.row["id"], chunk.index)
            output = job.outputs[chunk.index] = _Output(temp, handle, chunk.content_type)
        if chunk.data:
            self.store.write(output.handle, chunk.data)
            output.unflushed += len(chunk.data)
            if output.unflushed >= FLUSH_BYTES and not _busy(output.flushing):
                if output.flushing is not None:
                    output.flushing.result()  # a flush that failed fails the image now
                output.flushing = asyncio.ensure_future(
                    asyncio.to_thread(self.store.flush, output.handle)
                )
                output.unflushed = 0
        if chunk.last:
            final = self.store.path_for(job.row["id"], chunk.index, output.content_type)
            if output.flushing is not None:
                await output.flushing
            # fsync takes milliseconds per large image: not on the event loop.
            await asyncio.to_thread(self.store.commit, output.temp, output.handle, final)
            del job.outputs[chunk.index]
            _record_saved(job, chunk, final, output.content_type)

    def _save_whole(self, generation_id: uuid.UUID, index: int, data: bytes, final: Path) -> None:
        temp, handle = self.store.open_temp(generation_id, index)
        try:
            self.store.write(handle, data)
        except BaseException:
            self.store.discard(temp, handle)
            raise
        self.store.commit(temp, handle, final)

    def _discard_outputs(self, job: Job) -> None:
        for output in job.outputs.values():
            if output.flushing is not None:
                # Nobody waits for it any more: its error, if any, goes with the file.
                output.flushing.add_done_callback(_ignore_outcome)
            self.store.discard(output.temp, output.handle)
        job.outputs.clear()
        job.saved.clear()

    async def _on_failed(self, job: Job, failed: worker.Failed) -> None:
        if failed.reason == Reason.INTERRUPTED.value:
            await self._finish(job, self.queue.cancelled(job.fence), "cancelled", "")
        elif failed.retryable:
            await self._retry_or_fail(job, failed.reason, failed.message, True)
        else:
            details = dict(failed.details)
            for key in ("node_id", "node_type", "exception_type"):
                if getattr(failed, key):
                    details[key] = getattr(failed, key)
            await self._finish(
                job,
                self.queue.failed(job.fence, failed.reason, failed.message, details),
                "failed",
                failed.reason,
            )

    async def _retry_or_fail(self, job: Job, reason: str, message: str, retryable: bool) -> None:
        if retryable and job.fence.attempt < self.settings.max_attempts:
            await self._write(job, self.queue.requeue(job.fence, reason, message))
            return
        write = (
            self.queue.exhausted(job.fence, reason, message)
            if retryable
            else self.queue.failed(job.fence, reason, message, {})
        )
        await self._finish(job, write, "failed", reason)

    async def _finish(self, job: Job, write: Any, outcome: str, reason: str) -> None:
        row = await self._write(job, write)
        metrics.GENERATIONS.labels(outcome=outcome, reason=reason).inc()
        if row["started_at"] is not None and row["completed_at"] is not None:
            metrics.RUN_TIME.observe((row["completed_at"] - row["started_at"]).total_seconds())

    async def _write(self, job: Job, write: Any) -> Record:
        """Await a fenced write; no row means the lease is gone. Act on a cancel request."""
        row: Record | None = await write
        if row is None:
            raise LeaseLost()
        if row["cancel_requested"] and not job.cancel_sent and row["status"] not in TERMINAL:
            job.cancel_sent = True
            task = asyncio.create_task(self._cancel_job(job, row["prompt_id"]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return row

    async def _cancel_job(self, job: Job, prompt_id: str | None) -> None:
        outcome = await self.cancel_in_worker(job.handle, prompt_id)
        if outcome not in (worker.CANCEL_OUTCOME_DELETED, worker.CANCEL_OUTCOME_INTERRUPTED):
            # Not in ComfyUI yet (the Execute may still be on its way): try again
            # on the job's next event rather than let it run to the end.
            job.cancel_sent = False

    async def cancel_in_worker(
        self, handle: WorkerHandle, prompt_id: str | None
    ) -> worker.CancelOutcome.ValueType | None:
        if not prompt_id:
            return None
        try:
            reply = await handle.stub.Cancel(
                worker.CancelRequest(prompt_id=prompt_id), metadata=handle.metadata, timeout=10
            )
        except grpc.aio.AioRpcError as error:
            log.warning("cancel_failed", prompt_id=prompt_id, error=error.code().name)
            return None
        outcome: worker.CancelOutcome.ValueType = reply.outcome
        return outcome

    # ----- leases and housekeeping -------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            ids = list(self.jobs)
            try:
                held = await self.queue.heartbeat(ids)
            except Exception as error:
                log.warning("heartbeat_failed", error=str(error) or type(error).__name__)
                continue
            for generation_id in set(ids) - held:
                job = self.jobs.get(generation_id)
                # Finished meanwhile, or taken over: either way it is not ours to run.
                if job is not None and job.task is not None and generation_id in self.jobs:
                    still = await self.queue.heartbeat([generation_id])
                    if not still:
                        job.task.cancel()

    async def _prune_forever(self) -> None:
        while True:
            try:
                for path in await self.queue.prune(self.settings.retention_hours):
                    self.store.remove(path)
            except Exception as error:
                log.warning("prune_failed", error=str(error) or type(error).__name__)
            await asyncio.sleep(PRUNE_INTERVAL)


def _resend(sent: worker.ExecuteRequest, prompt_id: str) -> worker.ExecuteRequest:
    """The request again, as a copy: a call serializes its request later, so
    one already handed to a call must not change. The prompt may be queued by
    now, and under the id ComfyUI gave it."""
    again = worker.ExecuteRequest()
    again.CopyFrom(sent)
    again.first_send = False
    again.comfyui_prompt_id = prompt_id
    return again


def _record_saved(job: Job, chunk: worker.OutputChunk, final: Path, content_type: str) -> None:
    job.saved.append(
        {
            "index": chunk.index,
            "path": str(final),
            "content_type": content_type,
            "size_bytes": chunk.size_bytes,
        }
    )


def _busy(future: asyncio.Future[None] | None) -> bool:
    return future is not None and not future.done()


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
