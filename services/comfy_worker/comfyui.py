"""An aiohttp client for one ComfyUI server: every route the worker needs, as
ComfyUI really answers them (`../shared/comfyui/`).

One session per ComfyUI with a connection limit and timeouts. Transient
failures (connect errors, timeouts, 5xx) are retried with backoff and jitter;
4xx never is. A /prompt 400 is not an exception of the transport: it comes
back as `PromptRejected` with ComfyUI's body, for the classifier.
"""

from __future__ import annotations

import asyncio
import enum
import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from services import metrics
from services.log import get_logger
from services.settings import RetrySettings

log = get_logger(component="comfyui")
JsonDict = dict[str, Any]
T = TypeVar("T")
MODEL_LOADERS = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "loras": ("LoraLoader", "lora_name"),
    "vae": ("VAELoader", "vae_name"),
    "upscale_models": ("UpscaleModelLoader", "model_name"),
}
# The first release whose source we read with GET /api/jobs/{id}
# (comfy_execution/jobs.py; upstream PR #11054). Neither /features nor any
# other route advertises the jobs API, so the version is the only signal.
JOBS_API_SINCE = (0, 15, 0)
# The first release whose websocket we recorded sending `executed` for cached
# output nodes too, so that a run's frames hold all its outputs (witness.py).
# Releases before the execution rewrite of 2024 did not; an unknown version
# is taken for one of those.
FRAMES_HOLD_OUTPUTS_SINCE = (0, 3, 64)
# Statuses of a job in history; "cancelled" (an interrupted prompt) came after
# the first jobs release, which called it "failed".
FINISHED_STATUSES = ("completed", "failed", "cancelled")
VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


class ComfyUIUnreachable(Exception):
    """ComfyUI did not answer (or answered 5xx) after every retry."""


class ComfyUIRejected(Exception):
    """A 4xx that is not a validation answer: our request was wrong, never retried."""

    def __init__(self, route: str, status: int, body: str) -> None:
        super().__init__(f"{route} answered {status}: {body[:200]}")
        self.status = status


@dataclass
class PromptRejected(Exception):
    """POST /prompt answered 400: ComfyUI's validation error body."""

    body: JsonDict

    def __str__(self) -> str:
        return str(self.body.get("error", {}).get("message", "prompt rejected"))


class _Transient(Exception):
    pass


@dataclass(frozen=True)
class Accepted:
    prompt_id: str
    number: int


@dataclass(frozen=True)
class ImageRef:
    """An image ComfyUI reports in `outputs`, fetched with /view."""

    node_id: str
    filename: str
    subfolder: str
    type: str

    def query(self) -> dict[str, str]:
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


@dataclass
class QueueState:
    running: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def position(self, prompt_id: str) -> int | None:
        """0 while running, n when n prompts run or wait before it, None when absent."""
        if prompt_id in self.running:
            return 0
        if prompt_id in self.pending:
            return len(self.running) + self.pending.index(prompt_id)
        return None


class JobState(enum.Enum):
    UNKNOWN = "unknown"  # neither queued nor in history (never sent, or a restart lost it)
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"  # in history: completed, failed or interrupted


@dataclass(frozen=True)
class Job:
    """Where ComfyUI has one prompt, from /api/jobs/{id} or from /queue + /history."""

    state: JobState
    # Once finished: the entry in /history/{id}'s shape (prompt, outputs, status).
    entry: JsonDict | None = None


UNKNOWN_JOB = Job(JobState.UNKNOWN)


class ComfyUIClient:
    def __init__(
        self,
        base_url: str,
        *,
        retry: RetrySettings | None = None,
        request_timeout: float = 30.0,
        connections: int = 16,
    ) -> None:
        self.base_url = URL(base_url.rstrip("/"))
        self.retry = retry or RetrySettings()
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=5)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._features: JsonDict | None = None
        # The release /system_stats reports, (0, 0, 0) when it reports none.
        self._version: tuple[int, ...] | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=self._timeout,
                # ComfyUI answers 403 when an Origin differs from its Host.
                skip_auto_headers=("Origin",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def url(self, path: str) -> URL:
        return self.base_url.with_path(self.base_url.path.rstrip("/") + path)

    def websocket_url(self, client_id: str) -> URL:
        scheme = "wss" if self.base_url.scheme == "https" else "ws"
        return self.url("/ws").with_scheme(scheme).with_query(clientId=client_id)

    # ----- the routes -------------------------------------------------------------

    async def system_stats(self, *, retry: bool = True, timeout: float | None = None) -> JsonDict:
        result: JsonDict = await self._json("GET", "/system_stats", retry=retry, timeout=timeout)
        return result

    async def features(self) -> JsonDict:
        """`/features` where it exists (newer ComfyUI), else {}; cached."""
        if self._features is None:
            try:
                self._features = await self._json("GET", "/features")
            except ComfyUIRejected:
                self._features = {}
        return self._features

    def forget_server(self) -> None:
        """Drop what was learnt about the server (features, release): called when
        ComfyUI's websocket reopens, since a restart may be an upgrade or downgrade."""
        self._features = None
        self._version = None

    async def learn_version(self) -> tuple[int, ...]:
        """The release /system_stats reports, read once (until `forget_server`)."""
        if self._version is None:
            stats = await self.system_stats()
            self.know_version(str(stats.get("system", {}).get("comfyui_version", "")))
        assert self._version is not None
        return self._version

    def know_version(self, version: str) -> None:
        self._version = parse_version(version)
        log.info(
            "comfyui_version",
            version=version,
            jobs_api=self._version >= JOBS_API_SINCE,
            frames_hold_outputs=self.frames_hold_outputs,
        )

    async def has_jobs_api(self) -> bool:
        """Whether this ComfyUI serves /api/jobs, from its release. An
        unreadable version means no."""
        return await self.learn_version() >= JOBS_API_SINCE

    @property
    def frames_hold_outputs(self) -> bool:
        """Whether a run's websocket frames hold all its outputs, by the release
        learnt last; False while none is known."""
        return self._version is not None and self._version >= FRAMES_HOLD_OUTPUTS_SINCE

    async def job(self, prompt_id: str) -> Job:
        """GET /api/jobs/{id}: the prompt's state in one request (servers with the
        jobs API only). A finished job carries its outputs and execution status,
        so no /history read is needed."""
        answer = await self._json("GET", f"/api/jobs/{prompt_id}", missing_ok=True)
        if answer is None:
            return UNKNOWN_JOB
        status = answer.get("status")
        if status in FINISHED_STATUSES:
            return Job(JobState.FINISHED, entry=history_entry(prompt_id, answer))
        if status == "pending":
            return Job(JobState.PENDING)
        # in_progress (or a status newer than this client): not finished, keep following.
        return Job(JobState.RUNNING)

    async def queue_prompt(
        self, graph: Mapping[str, Any], client_id: str, prompt_id: str | None = None
    ) -> Accepted:
        body: JsonDict = {"prompt": graph, "client_id": client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        payload = json.dumps(body).encode()

        async def send() -> Accepted:
            async with self.session.post(
                self.url("/prompt"), data=payload, headers={"Content-Type": "application/json"}
            ) as response:
                await self._raise_for_transient("/prompt", response)
                if response.status == 400:
                    raise PromptRejected(await response.json(content_type=None))
                await self._raise_for_client_error("/prompt", response)
                answer = await response.json(content_type=None)
                return Accepted(str(answer["prompt_id"]), int(answer.get("number", 0)))

        return await self._with_retries("/prompt", send)

    async def history(self, prompt_id: str) -> JsonDict | None:
        """The history entry, or None while unknown or still running."""
        answer = await self._json("GET", f"/history/{prompt_id}")
        entry = answer.get(prompt_id) if isinstance(answer, dict) else None
        return entry if isinstance(entry, dict) else None

    async def queue(self) -> QueueState:
        answer = await self._json("GET", "/queue")
        return QueueState(
            running=[str(item[1]) for item in answer.get("queue_running", [])],
            pending=[str(item[1]) for item in answer.get("queue_pending", [])],
        )

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupts `prompt_id` only, and only while it runs (a no-op otherwise)."""
        await self._json("POST", "/interrupt", body={"prompt_id": prompt_id})

    async def delete(self, prompt_ids: Sequence[str]) -> None:
        """Removes waiting prompts; never touches the running one."""
        await self._json("POST", "/queue", body={"delete": list(prompt_ids)})

    async def free(self) -> None:
        """Asks ComfyUI to unload models and free memory (after an OOM)."""
        await self._json("POST", "/free", body={"unload_models": True, "free_memory": True})

    async def object_info(self, node_class: str) -> JsonDict:
        answer = await self._json("GET", f"/object_info/{node_class}")
        info = answer.get(node_class) if isinstance(answer, dict) else None
        return info if isinstance(info, dict) else {}

    async def models(self) -> dict[str, list[str]]:
        """Model names by kind, read from the loader nodes' input lists."""
        found: dict[str, list[str]] = {}
        for kind, (node_class, input_name) in MODEL_LOADERS.items():
            info = await self.object_info(node_class)
            spec = info.get("input", {}).get("required", {}).get(input_name)
            names = combo_options(spec) if isinstance(spec, list) else None
            if names is not None:
                found[kind] = [str(n) for n in names]
        return found

    async def upload_image(self, name: str, data: bytes) -> str:
        """Uploads to ComfyUI's input folder; returns the name ComfyUI chose."""

        async def send() -> str:
            form = aiohttp.FormData()
            form.add_field("image", data, filename=name, content_type="application/octet-stream")
            form.add_field("overwrite", "true")
            async with self.session.post(self.url("/upload/image"), data=form) as response:
                await self._raise_for_transient("/upload/image", response)
                await self._raise_for_client_error("/upload/image", response)
                answer = await response.json(content_type=None)
            subfolder = str(answer.get("subfolder") or "")
            return f"{subfolder}/{answer['name']}" if subfolder else str(answer["name"])

        return await self._with_retries("/upload/image", send)

    async def view(
        self, image: ImageRef, chunk_bytes: int = 1 << 20
    ) -> tuple[str, int, AsyncIterator[bytes]]:
        """(content type, size, chunks) of one output image."""
        response = await self._with_retries("/view", lambda: self._open_view(image))

        async def chunks() -> AsyncIterator[bytes]:
            # Whole chunks, not the socket's 256 KB reads: each chunk becomes a
            # message through the worker and GenerationService, each with its cost.
            try:
                while True:
                    try:
                        yield await response.content.readexactly(chunk_bytes)
                    except asyncio.IncompleteReadError as end:
                        if end.partial:
                            yield end.partial
                        return
            finally:
                response.release()

        size = response.content_length if response.content_length is not None else -1
        return response.content_type or "application/octet-stream", size, chunks()

    async def _open_view(self, image: ImageRef) -> aiohttp.ClientResponse:
        response = await self.session.get(self.url("/view"), params=image.query())
        try:
            await self._raise_for_transient("/view", response)
            await self._raise_for_client_error("/view", response)
        except BaseException:
            response.release()
            raise
        return response

    # ----- transport -----------------------------------------------------------------

    async def _json(
        self,
        method: str,
        path: str,
        *,
        body: JsonDict | None = None,
        retry: bool = True,
        timeout: float | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """The JSON answer; with `missing_ok`, None for a 404 that is ComfyUI's own
        JSON error body (an unknown id), never for a route the server lacks."""
        limit = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout) if timeout else None

        async def send() -> Any:
            async with self.session.request(
                method, self.url(path), json=body, timeout=limit
            ) as response:
                await self._raise_for_transient(path, response)
                if missing_ok and response.status == 404 and await _is_json_error(response):
                    metrics.COMFYUI_REQUESTS.labels(route=_route(path), outcome="ok").inc()
                    return None
                await self._raise_for_client_error(path, response)
                text = await response.text()
                return json.loads(text) if text.strip() else {}

        if not retry:
            try:
                return await send()
            except (_Transient, aiohttp.ClientError, TimeoutError) as error:
                raise ComfyUIUnreachable(f"{path}: {error or type(error).__name__}") from error
        return await self._with_retries(path, send)

    async def _with_retries(self, route: str, send: Callable[[], Awaitable[T]]) -> T:
        delays = self.retry.backoff_seconds
        for attempt in range(self.retry.attempts + 1):
            try:
                result = await send()
                metrics.COMFYUI_REQUESTS.labels(route=_route(route), outcome="ok").inc()
                return result
            except (_Transient, aiohttp.ClientError, TimeoutError) as error:
                metrics.COMFYUI_REQUESTS.labels(route=_route(route), outcome="transient").inc()
                if attempt >= self.retry.attempts:
                    raise ComfyUIUnreachable(
                        f"{route}: {error or type(error).__name__} "
                        f"(after {self.retry.attempts} retries)"
                    ) from error
                delay = delays[min(attempt, len(delays) - 1)] if delays else 0.0
                delay *= 1 + random.uniform(-self.retry.jitter, self.retry.jitter)
                log.warning("comfyui_retry", route=route, attempt=attempt + 1, delay=delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    async def _raise_for_transient(route: str, response: aiohttp.ClientResponse) -> None:
        if response.status >= 500:
            raise _Transient(f"{response.status} {await response.text()}"[:200])

    @staticmethod
    async def _raise_for_client_error(route: str, response: aiohttp.ClientResponse) -> None:
        if response.status >= 400:
            metrics.COMFYUI_REQUESTS.labels(route=_route(route), outcome="rejected").inc()
            raise ComfyUIRejected(route, response.status, await response.text())


def combo_options(spec: list[Any]) -> list[Any] | None:
    """A model list in either shape: [[names...], {...}] or ["COMBO", {"options": [...]}]."""
    if spec and isinstance(spec[0], list):
        return list(spec[0])
    if spec and spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options", []))
    return None


def output_images(history: JsonDict) -> list[ImageRef]:
    """Saved images (type output) in node order, as a history entry lists them."""
    found = []
    for node_id, output in history.get("outputs", {}).items():
        for image in output.get("images", []) if isinstance(output, dict) else []:
            if image.get("type", "output") == "output":
                found.append(
                    ImageRef(
                        str(node_id),
                        str(image["filename"]),
                        str(image.get("subfolder", "")),
                        "output",
                    )
                )
    return found


def parse_version(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a reported version ("0.3.64", "v0.15.0-3-gabc"),
    (0, 0, 0) when it is none."""
    match = VERSION.match(version.strip())
    return tuple(map(int, match.groups())) if match else (0, 0, 0)


def history_entry(prompt_id: str, job: JsonDict) -> JsonDict:
    """A finished job from /api/jobs/{id} in /history/{id}'s entry shape: the job
    carries the same outputs, the same status (`execution_status`) and the graph."""
    workflow = job.get("workflow") or {}
    return {
        "prompt": [
            job.get("priority", 0),
            prompt_id,
            workflow.get("prompt") or {},
            workflow.get("extra_data") or {},
            [],
        ],
        "outputs": job.get("outputs") or {},
        "status": job.get("execution_status") or {},
    }


async def _is_json_error(response: aiohttp.ClientResponse) -> bool:
    try:
        answer = json.loads(await response.text())
    except ValueError:
        return False
    return isinstance(answer, dict) and "error" in answer


def _route(path: str) -> str:
    """A metric label without ids in it."""
    parts = path.strip("/").split("/")
    return "/" + "/".join(parts[:2] if parts[0] == "api" else parts[:1])
