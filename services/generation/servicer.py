"""GenerationService over gRPC. Every method checks its input first and
changes nothing when it is bad; every read is limited to the caller's own
generations (another caller's are NOT_FOUND, as if they did not exist)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from asyncpg import Record

from services.contracts import gen, gen_grpc
from services.errors import FailedPrecondition, InvalidArgument, NotFound, Reason
from services.generation import convert
from services.generation.dispatcher import Dispatcher
from services.generation.events import EventHub
from services.generation.inputs import check_images
from services.generation.queue import Queue
from services.generation.store import Store
from services.generation.templates import (
    TEMPLATE_NAME,
    ImageRef,
    TemplateLibrary,
    to_proto,
    values_from_proto,
)
from services.generation.workers import WorkerPool
from services.grpc_server import current_principal
from services.settings import Settings

DEFAULT_PAGE = 50
MAX_PAGE = 500
PRIORITY_RANGE = (-100, 100)
REQUEST_ID_MAX = 128
# Issued tokens are about 100 characters; a cap keeps json.loads from deep nesting.
TOKEN_MAX = 256
CHUNK = 1 << 20
DIGEST_ON_LOOP_BYTES = 64 * 1024
# How long CancelGeneration waits for a running generation to stop.
CANCEL_WAIT_SECONDS = 5.0


# uuid.UUID() also takes braces, "urn:uuid:", surrounding whitespace, any
# number of hyphens and other scripts' digits: an id is its canonical text only,
# so that what a caller sends is exactly what every reply and header shows.
CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    if not CANONICAL_ID.fullmatch(value):
        raise InvalidArgument.field(field, "not a generation id (a UUID: 8-4-4-4-12 hex digits)")
    return uuid.UUID(value)


async def request_digest(request: gen.CreateGenerationRequest) -> bytes | None:
    """What a request_id stands for: the request as the caller sent it, so that
    a retry matches and another request under the same key does not."""
    if not request.request_id:
        return None
    data = request.SerializeToString(deterministic=True)
    if len(data) < DIGEST_ON_LOOP_BYTES:
        return hashlib.sha256(data).digest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).digest())  # 0.6 ms a MB


def encode_token(created_at: datetime, generation_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(generation_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, uuid.UUID]:
    """The position a page token names; anything else is refused before it
    reaches the database, which would fail on a time out of its range."""
    try:
        if len(token) > TOKEN_MAX:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, generation_id = json.loads(raw)
        if not isinstance(created, str) or not isinstance(generation_id, str):
            raise ValueError("not a pair of strings")
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None:
            raise ValueError("no time zone")
        return moment.astimezone(UTC), uuid.UUID(generation_id)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument.field("page_token", "not a token this service issued") from None


def check_template_filter(name: str) -> None:
    """A template filter is a template name or empty: other text (NUL among
    it) could never match, and PostgreSQL refuses NUL outright."""
    if name and not TEMPLATE_NAME.fullmatch(name):
        raise InvalidArgument.field("template", f"must match {TEMPLATE_NAME.pattern}")


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        library: TemplateLibrary,
        hub: EventHub,
        workers: WorkerPool,
        dispatcher: Dispatcher,
        store: Store,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.library = library
        self.hub = hub
        self.workers = workers
        self.dispatcher = dispatcher
        self.store = store

    async def CreateGeneration(
        self, request: gen.CreateGenerationRequest, context: grpc.aio.ServicerContext
    ) -> gen.CreateGenerationResponse:
        template = self.library.get(request.template)
        if not PRIORITY_RANGE[0] <= request.priority <= PRIORITY_RANGE[1]:
            raise InvalidArgument.field(
                "priority", f"between {PRIORITY_RANGE[0]} and {PRIORITY_RANGE[1]}"
            )
        if len(request.request_id) > REQUEST_ID_MAX or not request.request_id.isprintable():
            raise InvalidArgument.field(
                "request_id", f"printable, at most {REQUEST_ID_MAX} characters"
            )
        limit = self.settings.queue.max_timeout_seconds
        if request.timeout_seconds > limit:
            raise InvalidArgument.field("timeout_seconds", f"at most {limit}")
        # Decoding and inflating images takes up to a few hundred ms of CPU
        # (mostly outside the GIL): never on the loop that serves every stream.
        inputs = (
            await asyncio.to_thread(check_images, request.input_images)
            if request.input_images
            else []
        )
        values = values_from_proto(request.parameters)
        given = {name for name, _ in inputs}
        refs = {k: v.name for k, v in values.items() if isinstance(v, ImageRef)}
        missing = [
            (f"parameters.{k}", f"names image {ref!r}, which is not in input_images")
            for k, ref in sorted(refs.items())
            if ref not in given
        ]
        if missing:
            raise InvalidArgument(missing)
        unused = given - set(refs.values())
        if unused:
            raise InvalidArgument.field(
                "input_images", f"not used by any parameter: {', '.join(sorted(unused))}"
            )
        resolved = self.library.resolve(
            template.name, values, available_models=self.workers.models()
        )
        digest = await request_digest(request)
        # Shielded: a caller hanging up must not leave a row its create
        # dispatched without the job that runs it (it would wait out its lease).
        row, created, position = await asyncio.shield(
            self._create(
                principal=current_principal.get(),
                request_id=request.request_id or None,
                template=template.name,
                parameters=convert.parameters(template, resolved.parameters),
                graph=json.dumps(resolved.graph),
                checkpoint=resolved.checkpoint,
                priority=request.priority,
                timeout_seconds=request.timeout_seconds or self.settings.comfyui.timeout_seconds,
                inputs=inputs,
                request_digest=digest,
            )
        )
        return gen.CreateGenerationResponse(
            generation=convert.generation(row, position), created=created
        )

    async def _create(self, **values: Any) -> tuple[Record, bool, int]:
        """Queue.create, offering it a free worker slot: on an idle system the
        new generation is dispatched by the statement that creates it."""
        handle = self.dispatcher.reserve(values["checkpoint"])
        try:
            row, created, position = await self.queue.create(
                **values, direct_to=handle.name if handle else None
            )
        except BaseException:
            if handle is not None:
                self.dispatcher.unreserve(handle)
            raise
        if handle is not None:
            if created and row["status"] == "DISPATCHED":
                self.dispatcher.start_created(row, handle, values["inputs"])
            else:
                self.dispatcher.unreserve(handle)
        return row, created, position

    async def GetGeneration(
        self, request: gen.GetGenerationRequest, context: grpc.aio.ServicerContext
    ) -> gen.GetGenerationResponse:
        return gen.GetGenerationResponse(generation=await self._generation(request.id))

    async def _generation(self, value: str) -> gen.Generation:
        row = await self.queue.get(parse_id(value), current_principal.get())
        return convert.generation(row, await self.queue.queue_position(row))

    async def ListGenerations(
        self, request: gen.ListGenerationsRequest, context: grpc.aio.ServicerContext
    ) -> gen.ListGenerationsResponse:
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        statuses = []
        for n, status in enumerate(request.statuses):
            if status not in gen.GenerationStatus.values() or status == 0:
                raise InvalidArgument.field(f"statuses[{n}]", "not a generation status")
            statuses.append(convert.status_name(status))
        check_template_filter(request.template)
        before = decode_token(request.page_token) if request.page_token else None
        rows = await self.queue.page(
            current_principal.get(),
            limit=size + 1,
            statuses=statuses,
            template=request.template or None,
            before=before,
        )
        page = rows[:size]
        token = encode_token(page[-1]["created_at"], page[-1]["id"]) if len(rows) > size else ""
        return gen.ListGenerationsResponse(
            generations=[convert.generation(r) for r in page], next_page_token=token
        )

    async def CancelGeneration(
        self, request: gen.CancelGenerationRequest, context: grpc.aio.ServicerContext
    ) -> gen.CancelGenerationResponse:
        row, changed = await self.queue.cancel(parse_id(request.id), current_principal.get())
        if not changed:
            raise FailedPrecondition(
                f"generation {row['id']} is already {row['status']}",
                reason=Reason.ALREADY_TERMINAL.value,
            )
        if row["status"] in ("DISPATCHED", "RUNNING"):
            handle = self.workers.workers.get(row["worker"] or "")
            if handle is not None:
                # Straight to the worker: the owner may be another replica.
                await self.dispatcher.cancel_in_worker(handle, row["prompt_id"])
            row = await self._when_finished(row, CANCEL_WAIT_SECONDS)
        return gen.CancelGenerationResponse(generation=convert.generation(row))

    async def _when_finished(self, row: Record, seconds: float) -> Record:
        """The row once it has ended, or as it is after `seconds`: a caller that
        cancels wants to see the run stopped (tens of ms), not still RUNNING."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for _ in self.hub.watch(row["id"], row["last_event_seq"]):
                    pass  # the watch ends with the terminal event
        return await self.queue.get(row["id"], None)

    async def GetGenerationImage(
        self, request: gen.GetGenerationImageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen.GetGenerationImageResponse]:
        row = await self.queue.get(parse_id(request.id), current_principal.get())
        if row["status"] != "COMPLETED":
            raise FailedPrecondition(
                f"generation is {row['status']}, not COMPLETED", reason=Reason.NOT_COMPLETED.value
            )
        images = convert.outputs(row["outputs"])
        if not 0 <= request.index < len(images):
            raise InvalidArgument.field("index", f"between 0 and {len(images) - 1}")
        image = images[request.index]
        path = self.store.resolve(image.path)
        if path is None:
            raise NotFound(
                "the image is no longer in the store", reason=Reason.IMAGE_NOT_FOUND.value
            )
        with path.open("rb") as handle:
            first = True
            while chunk := handle.read(CHUNK):
                yield gen.GetGenerationImageResponse(image=image if first else None, data=chunk)
                first = False

    async def WatchGeneration(
        self, request: gen.WatchGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen.WatchGenerationResponse]:
        generation_id = parse_id(request.id)
        row = await self.queue.get(generation_id, current_principal.get())
        if not 0 <= request.after_sequence <= row["last_event_seq"]:
            raise InvalidArgument.field(
                "after_sequence", f"between 0 and {row['last_event_seq']} (the last event)"
            )
        snapshot = convert.generation(row, await self.queue.queue_position(row))
        yield gen.WatchGenerationResponse(snapshot=snapshot)
        after = request.after_sequence
        if snapshot.status in convert.TERMINAL_STATUSES and after >= row["last_event_seq"]:
            return
        async for event in self.hub.watch(generation_id, after):
            yield convert.watch_response(event)

    async def WatchGenerations(
        self, request: gen.WatchGenerationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen.WatchGenerationsResponse]:
        for n, status in enumerate(request.statuses):
            if status not in gen.GenerationStatus.values() or status == 0:
                raise InvalidArgument.field(f"statuses[{n}]", "not a generation status")
        check_template_filter(request.template)
        wanted = set(request.statuses)
        with self.hub.watch_principal(current_principal.get()) as sub:
            while (event := await sub.events.get()) is not None:
                message = convert.event(event)
                if wanted and message.status not in wanted:
                    continue
                if request.template and event["template"] != request.template:
                    continue
                yield gen.WatchGenerationsResponse(event=message)

    async def ListTemplates(
        self, request: gen.ListTemplatesRequest, context: grpc.aio.ServicerContext
    ) -> gen.ListTemplatesResponse:
        return gen.ListTemplatesResponse(templates=[to_proto(t) for t in self.library.templates()])

    async def GetStats(
        self, request: gen.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> gen.GetStatsResponse:
        counts = await self.queue.counts()
        return gen.GetStatsResponse(
            queue=[
                gen.StatusCount(status=convert.status_value(name), count=n)
                for name, n in sorted(counts.items())
            ],
            workers=[
                gen.WorkerState(
                    name=h.name,
                    address=h.address,
                    serving=h.serving,
                    slots_total=h.slots,
                    slots_used=h.in_use,
                    last_checkpoint=h.last_checkpoint or "",
                )
                for h in self.workers.workers.values()
            ],
            dispatch_paused=self.dispatcher.paused is not None,
            pause_reason=self.dispatcher.paused or "",
        )
