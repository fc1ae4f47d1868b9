"""The ComfyUI simulator: ComfyUI's HTTP and websocket API as recorded from a
real server (`../shared/comfyui/`), with a simulated GPU and fault knobs.

Prompts are validated against the recorded /object_info, queued, and run one
at a time in order: each node sends `executing`, sampler nodes take
steps x step_seconds with a `progress` per step, output nodes write real PNGs,
and the run ends with the recorded message sequence (history written before
the final `executing` with node null). Knobs, as methods and under
`/_simulator/...`: OOM at a node, HTTP errors, dropped websockets, hang,
restart (losing queue and history) and step time. `runs` is the GPU's
timeline for benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import tempfile
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from services.simulator import images, validation

OBJECT_INFO = Path(__file__).with_name("object_info.json")
DEFAULT_CHECKPOINTS = ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"]
DEFAULT_LORAS = ["detail-tweaker.safetensors"]
DEFAULT_VAE = ["vae-ft-mse-840000-ema-pruned.safetensors"]
DEFAULT_UPSCALERS = ["RealESRGAN_x4plus.pth"]
OOM_MESSAGE = (
    "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
    "Currently allocated     : 7.61 GiB\nRequested               : 1.50 GiB\n"
)
RECORDED_VERSION = "0.3.64"
# A release whose source has /api/jobs; /system_stats is where it shows.
JOBS_API_VERSION = "0.15.0"
REQUEST_LOG = 10_000
JsonDict = dict[str, Any]


@dataclass
class SimulatorOptions:
    step_seconds: float = 0.05
    checkpoints: list[str] | None = None
    loras: list[str] | None = None
    vae: list[str] | None = None
    upscale_models: list[str] | None = None
    output_dir: Path | None = None
    history_max: int = 10_000
    # Older ComfyUI releases ignore a client-chosen prompt_id and assign their own.
    client_prompt_ids: bool = True
    # Behave as a newer ComfyUI (JOBS_API_VERSION) serving /api/jobs; off, the
    # recorded 0.3.64 that has no such route.
    jobs_api: bool = False


@dataclass
class Run:
    """One prompt on the simulated GPU (time.monotonic() seconds)."""

    prompt_id: str
    received: float
    started: float
    ended: float | None = None


@dataclass
class Prompt:
    number: int
    prompt_id: str
    graph: JsonDict
    extra_data: JsonDict
    outputs: list[str]
    received: float

    def as_queue_item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return str(value) if value else None


class _Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id


class _NodeFailed(Exception):
    def __init__(self, node_id: str, exception_type: str, message: str) -> None:
        self.node_id, self.exception_type, self.message = node_id, exception_type, message


@dataclass
class Faults:
    oom: dict[str, int] = field(default_factory=dict)  # node id or class -> times
    http_status: int = 500
    http_errors: int = 0
    http_paths: tuple[str, ...] = ()
    # Set while not hung: waiting on it parks requests and the GPU without polling.
    running: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.running.set()

    async def unless_hung(self) -> None:
        await self.running.wait()


class Simulator:
    def __init__(self, options: SimulatorOptions | None = None) -> None:
        self.options = options or SimulatorOptions()
        root = self.options.output_dir or Path(tempfile.mkdtemp(prefix="comfyui-sim-"))
        self.dirs = {kind: root / kind for kind in ("output", "input", "temp")}
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.object_info = self._object_info()
        self.runs: list[Run] = []
        # (method, path) of every ComfyUI request, oldest first: what a test
        # asserts a client did or did not ask.
        self.requests: deque[tuple[str, str]] = deque(maxlen=REQUEST_LOG)
        self.faults = Faults()
        self._sockets: dict[str, set[web.WebSocketResponse]] = {}
        self._reset_state()
        self._runner: asyncio.Task[None] | None = None

    def _reset_state(self) -> None:
        self.pending: list[Prompt] = []
        self.running: Prompt | None = None
        self.history: OrderedDict[str, JsonDict] = OrderedDict()
        self._cache: dict[str, JsonDict] = {}
        self._number = 0
        self._counters: dict[str, int] = {}
        self._interrupt: str | None = None
        self._wake = asyncio.Event()

    def _object_info(self) -> JsonDict:
        info: JsonDict = json.loads(OBJECT_INFO.read_text())
        lists = {
            "ckpt_name": _or(self.options.checkpoints, DEFAULT_CHECKPOINTS),
            "lora_name": _or(self.options.loras, DEFAULT_LORAS),
            "vae_name": _or(self.options.vae, DEFAULT_VAE),
        }
        for node in info.values():
            for section in ("required", "optional"):
                for name, spec in node.get("input", {}).get(section, {}).items():
                    if name in lists and isinstance(spec[0], list):
                        spec[0] = list(lists[name])
        upscale = info.get("UpscaleModelLoader", {}).get("input", {}).get("required", {})
        if "model_name" in upscale:
            upscale["model_name"][0] = _or(self.options.upscale_models, DEFAULT_UPSCALERS)
        return info

    def _refresh_input_lists(self) -> None:
        names = sorted(p.name for p in self.dirs["input"].iterdir() if p.is_file())
        for kind in ("LoadImage", "LoadImageMask"):
            spec = self.object_info.get(kind, {}).get("input", {}).get("required", {}).get("image")
            if spec and isinstance(spec[0], list):
                spec[0] = names

    # ----- lifecycle and knobs -------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run_forever(), name="simulator-runner")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self.drop_websockets()

    def inject_oom(self, node: str = "KSampler", times: int = 1) -> None:
        """The next `times` executions of `node` (an id or a class) fail with CUDA OOM."""
        self.faults.oom[node] = times

    def fail_http(self, status: int = 500, times: int = 1, paths: tuple[str, ...] = ()) -> None:
        """The next `times` HTTP requests (to `paths` prefixes, or any) answer `status`."""
        self.faults.http_status, self.faults.http_errors, self.faults.http_paths = (
            status,
            times,
            paths,
        )

    def set_hang(self, hung: bool) -> None:
        """While hung, HTTP requests get no answer and the GPU makes no progress."""
        if hung:
            self.faults.running.clear()
        else:
            self.faults.running.set()

    def set_step_seconds(self, seconds: float) -> None:
        self.options.step_seconds = seconds

    async def drop_websockets(self) -> None:
        sockets = [ws for group in self._sockets.values() for ws in group]
        self._sockets.clear()
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close()

    async def restart(self) -> None:
        """As a real restart: queue, history and cache are gone, sockets closed."""
        await self.stop()
        self._reset_state()
        self.start()

    # ----- the queue -------------------------------------------------------------

    def enqueue(
        self, graph: JsonDict, extra_data: JsonDict, outputs: list[str], prompt_id: str
    ) -> Prompt:
        self._number += 1
        prompt = Prompt(self._number, prompt_id, graph, extra_data, outputs, time.monotonic())
        self.pending.append(prompt)
        self._wake.set()
        return prompt

    async def announce_queue(self) -> None:
        """What ComfyUI broadcasts when a prompt is queued."""
        await self._broadcast_status()

    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running else 0)

    def delete_pending(self, prompt_ids: list[str]) -> None:
        self.pending = [p for p in self.pending if p.prompt_id not in prompt_ids]

    def interrupt(self, prompt_id: str | None) -> None:
        if self.running is not None and prompt_id in (None, self.running.prompt_id):
            self._interrupt = self.running.prompt_id

    async def _run_forever(self) -> None:
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            prompt = self.pending.pop(0)
            self.running = prompt
            try:
                await self._execute(prompt)
            finally:
                self.running = None
                self._interrupt = None

    async def _execute(self, prompt: Prompt) -> None:
        await self._broadcast_status()
        run = Run(prompt.prompt_id, prompt.received, time.monotonic())
        self.runs.append(run)
        messages: list[list[Any]] = []

        async def send(kind: str, data: JsonDict, record: bool = False) -> None:
            if record:
                messages.append([kind, data])
            await self._send(prompt, kind, data)

        await send("execution_start", {"prompt_id": prompt.prompt_id, "timestamp": _now_ms()}, True)
        key = hashlib.sha256(json.dumps(prompt.graph, sort_keys=True).encode()).hexdigest()
        outputs: JsonDict = {}
        status = "success"
        try:
            if key in self._cache:
                await send(
                    "execution_cached",
                    {
                        "nodes": list(prompt.graph),
                        "prompt_id": prompt.prompt_id,
                        "timestamp": _now_ms(),
                    },
                    True,
                )
                outputs = self._cache[key]
                for node_id, output in outputs.items():
                    await send(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": output,
                            "prompt_id": prompt.prompt_id,
                        },
                    )
            else:
                await send(
                    "execution_cached",
                    {"nodes": [], "prompt_id": prompt.prompt_id, "timestamp": _now_ms()},
                    True,
                )
                outputs = await self._execute_nodes(prompt, send)
                self._cache[key] = outputs
            run.ended = time.monotonic()
            await send(
                "execution_success", {"prompt_id": prompt.prompt_id, "timestamp": _now_ms()}, True
            )
        except _Interrupted as stop:
            run.ended = time.monotonic()
            status = "error"
            await send(
                "execution_interrupted",
                {
                    "prompt_id": prompt.prompt_id,
                    "node_id": stop.node_id,
                    "node_type": prompt.graph[stop.node_id]["class_type"],
                    "executed": [],
                    "timestamp": _now_ms(),
                },
                True,
            )
        except _NodeFailed as failure:
            run.ended = time.monotonic()
            status = "error"
            await send(
                "execution_error",
                {
                    "prompt_id": prompt.prompt_id,
                    "node_id": failure.node_id,
                    "node_type": prompt.graph[failure.node_id]["class_type"],
                    "executed": [],
                    "exception_message": failure.message,
                    "exception_type": failure.exception_type,
                    "traceback": [
                        '  File "/home/user1/ComfyUI/execution.py", line 496, in execute\n'
                    ],
                    "current_inputs": {},
                    "current_outputs": {},
                    "timestamp": _now_ms(),
                },
                True,
            )
        await self._broadcast_status(after=prompt)
        self._write_history(prompt, outputs, status, messages)
        await self._send(prompt, "executing", {"node": None, "prompt_id": prompt.prompt_id})

    async def _execute_nodes(
        self, prompt: Prompt, send: Callable[..., Awaitable[None]]
    ) -> JsonDict:
        outputs: JsonDict = {}
        states: JsonDict = {}

        async def progress_state(node_id: str, value: float, top: float, state: str) -> None:
            states[node_id] = {
                "value": value,
                "max": top,
                "state": state,
                "node_id": node_id,
                "prompt_id": prompt.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            await send("progress_state", {"prompt_id": prompt.prompt_id, "nodes": dict(states)})

        for node_id in _order(prompt.graph, prompt.outputs):
            node = prompt.graph[node_id]
            await self._checkpoint(prompt, node_id)
            await progress_state(node_id, 0.0, 1.0, "running")
            await send(
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": prompt.prompt_id},
            )
            self._maybe_fail(node_id, node["class_type"])
            steps = node.get("inputs", {}).get("steps")
            done: tuple[float, float] = (1.0, 1.0)
            if isinstance(steps, int) and not isinstance(steps, bool):
                for value in range(1, steps + 1):
                    await asyncio.sleep(self.options.step_seconds)
                    await self._checkpoint(prompt, node_id)
                    await progress_state(node_id, value, steps, "running")
                    await send(
                        "progress",
                        {
                            "value": value,
                            "max": steps,
                            "prompt_id": prompt.prompt_id,
                            "node": node_id,
                        },
                    )
                done = (steps, steps)
            if node["class_type"] in validation.OUTPUT_CLASSES:
                saved = await asyncio.to_thread(self._save_images, prompt.graph, node_id)
                outputs[node_id] = {"images": saved}
                await send(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": outputs[node_id],
                        "prompt_id": prompt.prompt_id,
                    },
                )
            await progress_state(node_id, *done, "finished")
        return outputs

    async def _checkpoint(self, prompt: Prompt, node_id: str) -> None:
        """Where a real ComfyUI notices an interrupt: between nodes and sampler steps."""
        await self.faults.unless_hung()
        if self._interrupt == prompt.prompt_id:
            raise _Interrupted(node_id)

    def _maybe_fail(self, node_id: str, class_type: str) -> None:
        for key in (node_id, class_type):
            if self.faults.oom.get(key, 0) > 0:
                self.faults.oom[key] -= 1
                raise _NodeFailed(node_id, "torch.OutOfMemoryError", OOM_MESSAGE)

    def _save_images(self, graph: JsonDict, node_id: str) -> list[JsonDict]:
        width, height, batch = images.output_size(graph, node_id, self.input_path)
        seed = images.graph_seed(graph)
        node = graph[node_id]
        if node["class_type"] == "SaveImage":
            kind = "output"
            prefix = str(node["inputs"].get("filename_prefix", "ComfyUI"))
        else:
            kind = "temp"
            prefix = "ComfyUI_temp_" + uuid.uuid4().hex[:5]
        subfolder, _, stem = prefix.replace("\\", "/").rpartition("/")
        subfolder = "/".join(p for p in subfolder.split("/") if p not in ("", ".", ".."))
        folder = self.dirs[kind] / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        for n in range(batch):
            counter = self._counters.get(f"{kind}/{prefix}", 0) + 1
            self._counters[f"{kind}/{prefix}"] = counter
            name = f"{stem or 'ComfyUI'}_{counter:05}_.png"
            (folder / name).write_bytes(images.render_png(width, height, seed + n))
            saved.append({"filename": name, "subfolder": subfolder, "type": kind})
        return saved

    def _write_history(
        self, prompt: Prompt, outputs: JsonDict, status: str, messages: list[Any]
    ) -> None:
        self.history[prompt.prompt_id] = {
            "prompt": prompt.as_queue_item(),
            "outputs": outputs,
            "status": {
                "status_str": status,
                "completed": status == "success",
                "messages": messages,
            },
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                for n in outputs
            },
        }
        while len(self.history) > self.options.history_max:
            self.history.popitem(last=False)

    # ----- websockets --------------------------------------------------------------

    def add_socket(self, sid: str, ws: web.WebSocketResponse) -> None:
        self._sockets.setdefault(sid, set()).add(ws)

    def remove_socket(self, sid: str, ws: web.WebSocketResponse) -> None:
        self._sockets.get(sid, set()).discard(ws)

    async def _send(self, prompt: Prompt, kind: str, data: JsonDict) -> None:
        """Per-prompt messages reach only the prompt's client (everyone when it has none)."""
        if prompt.client_id is None:
            targets = [ws for group in self._sockets.values() for ws in group]
        else:
            targets = list(self._sockets.get(prompt.client_id, ()))
        await _deliver(targets, {"type": kind, "data": data})

    async def _broadcast_status(self, after: Prompt | None = None) -> None:
        remaining = len(self.pending) + (0 if after is not None else 1 if self.running else 0)
        targets = [ws for group in self._sockets.values() for ws in group]
        await _deliver(targets, status_message(remaining))

    def input_path(self, name: str) -> Path:
        return safe_path(self.dirs["input"], "", name)

    @property
    def version(self) -> str:
        return JOBS_API_VERSION if self.options.jobs_api else RECORDED_VERSION


def status_message(remaining: int, sid: str | None = None) -> JsonDict:
    data: JsonDict = {"status": {"exec_info": {"queue_remaining": remaining}}}
    if sid is not None:
        data["sid"] = sid
    return {"type": "status", "data": data}


async def _deliver(targets: list[web.WebSocketResponse], message: JsonDict) -> None:
    text = json.dumps(message)
    for ws in targets:
        with contextlib.suppress(Exception):
            await ws.send_str(text)


def _or(given: list[str] | None, default: list[str]) -> list[str]:
    """An empty list is a choice (a host with no models), unlike None."""
    return list(default if given is None else given)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _order(graph: JsonDict, outputs: list[str]) -> list[str]:
    """Dependency order of the nodes the outputs need, as ComfyUI executes them."""
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in graph[node_id].get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and value[0] in graph:
                visit(str(value[0]))
        ordered.append(node_id)

    for output in outputs:
        visit(output)
    return ordered


def safe_path(root: Path, subfolder: str, name: str) -> Path:
    """A file under `root`; anything that would leave it raises ValueError."""
    path = (root / subfolder / name).resolve()
    if not path.is_relative_to(root.resolve()) or not name:
        raise ValueError("path leaves its folder")
    return path


SIMULATOR_KEY = web.AppKey("simulator", Simulator)


async def shutdown(runner: web.AppRunner) -> None:
    """Stop listening, close the websockets, then clean up; otherwise aiohttp
    waits its whole shutdown timeout for clients' sockets to close."""
    for site in list(runner.sites):
        await site.stop()
    for app in [runner.app] if isinstance(runner.app, web.Application) else []:
        await app[SIMULATOR_KEY].drop_websockets()
    await runner.cleanup()


def create_app(options: SimulatorOptions | None = None) -> web.Application:
    from services.simulator.routes import add_routes, middlewares

    simulator = Simulator(options)
    app = web.Application(middlewares=middlewares(simulator), client_max_size=128 * 1024 * 1024)
    app[SIMULATOR_KEY] = simulator
    add_routes(app, simulator)

    async def lifecycle(app: web.Application) -> Any:
        simulator.start()
        yield
        await simulator.stop()

    app.cleanup_ctx.append(lifecycle)
    return app
