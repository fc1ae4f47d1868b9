"""The simulator's HTTP routes, each also under /api as ComfyUI serves them,
plus the `/_simulator/...` control API the fault tests drive from outside.

With `SimulatorOptions.jobs_api`, the jobs routes of newer releases too. ComfyUI
declares them as /api/jobs and then adds its /api prefix to every route, so
they answer at /api/jobs and /api/api/jobs, never at /jobs."""

from __future__ import annotations

import json
import platform
import time
import uuid
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from services.simulator import jobs, validation
from services.simulator.app import Simulator, safe_path, status_message

CONTROL = "/_simulator/"


def middlewares(simulator: Simulator) -> list[Any]:
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL):
            return await handler(request)
        simulator.requests.append((request.method, request.path))
        await simulator.faults.unless_hung()
        f = simulator.faults
        if f.http_errors > 0 and (not f.http_paths or request.path.startswith(f.http_paths)):
            f.http_errors -= 1
            return web.Response(status=f.http_status, text=f"{f.http_status} simulated failure")
        return await handler(request)

    @web.middleware
    async def same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and origin.split("://", 1)[-1].rstrip("/") != request.host:
            return web.Response(status=403)
        return await handler(request)

    return [faults, same_origin]


def add_routes(app: web.Application, sim: Simulator) -> None:
    handlers = _Handlers(sim)
    table = [
        ("POST", "/prompt", handlers.post_prompt),
        ("GET", "/prompt", handlers.get_prompt),
        ("GET", "/queue", handlers.get_queue),
        ("POST", "/queue", handlers.post_queue),
        ("POST", "/interrupt", handlers.interrupt),
        ("GET", "/history", handlers.get_history),
        ("GET", "/history/{prompt_id}", handlers.get_history_one),
        ("POST", "/history", handlers.post_history),
        ("GET", "/view", handlers.view),
        ("POST", "/upload/image", handlers.upload),
        ("GET", "/object_info", handlers.object_info),
        ("GET", "/object_info/{node_class}", handlers.object_info_one),
        ("GET", "/system_stats", handlers.system_stats),
        ("GET", "/features", handlers.features),
        ("POST", "/free", handlers.free),
        ("GET", "/models", handlers.models),
        ("GET", "/models/{folder}", handlers.models_in),
        ("GET", "/embeddings", handlers.embeddings),
        ("GET", "/ws", handlers.websocket),
    ]
    for method, path, handler in table:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    if sim.options.jobs_api:
        for prefix in ("/api", "/api/api"):
            app.router.add_get(prefix + "/jobs", handlers.get_jobs)
            app.router.add_get(prefix + "/jobs/{job_id}", handlers.get_job)
    app.router.add_get(CONTROL + "runs", handlers.control_runs)
    app.router.add_get(CONTROL + "requests", handlers.control_requests)
    app.router.add_post(CONTROL + "faults", handlers.control_faults)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=json.dumps)


class _Handlers:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.Response(
                status=500, text="500 Internal Server Error\n\nServer got itself in trouble"
            )
        if not isinstance(body, dict) or "prompt" not in body:
            return _json(
                validation.error("no_prompt", "No prompt provided", "No prompt provided"), 400
            )
        self.sim._refresh_input_lists()
        problem, outputs = validation.validate(
            body["prompt"], self.sim.object_info, lambda name: self._input_exists(name)
        )
        if problem is not None:
            return _json(problem, 400)
        chosen = body.get("prompt_id") if self.sim.options.client_prompt_ids else None
        prompt_id = str(chosen or uuid.uuid4())
        extra = dict(body.get("extra_data") or {})
        if body.get("client_id"):
            extra["client_id"] = body["client_id"]
        if self.sim.options.jobs_api:
            # Releases with the jobs API stamp each prompt; its create_time comes from here.
            extra["create_time"] = int(time.time() * 1000)
        prompt = self.sim.enqueue(body["prompt"], extra, outputs, prompt_id)
        await self.sim.announce_queue()
        return _json({"prompt_id": prompt.prompt_id, "number": prompt.number, "node_errors": {}})

    def _input_exists(self, name: str) -> bool:
        try:
            return self.sim.input_path(name).is_file()
        except ValueError:
            return False

    async def get_prompt(self, request: web.Request) -> web.Response:
        return _json({"exec_info": {"queue_remaining": self.sim.queue_remaining()}})

    async def get_queue(self, request: web.Request) -> web.Response:
        running = [self.sim.running.as_queue_item()] if self.sim.running else []
        pending = [p.as_queue_item() for p in self.sim.pending]
        return _json({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if body.get("clear"):
            self.sim.pending.clear()
        if isinstance(body.get("delete"), list):
            self.sim.delete_pending([str(i) for i in body["delete"]])
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await _body(request)
        self.sim.interrupt(body.get("prompt_id"))
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        items = list(self.sim.history.items())
        if "max_items" in request.query and request.query["max_items"].isdigit():
            items = items[-int(request.query["max_items"]) :]
        return _json(dict(items))

    async def get_history_one(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.sim.history.get(prompt_id)
        return _json({prompt_id: entry} if entry is not None else {})

    def _queue_items(self) -> tuple[list[list[Any]], list[list[Any]]]:
        running = [self.sim.running.as_queue_item()] if self.sim.running else []
        return running, [p.as_queue_item() for p in self.sim.pending]

    async def get_jobs(self, request: web.Request) -> web.Response:
        running, pending = self._queue_items()
        try:
            answer = jobs.list_jobs(request.query, running, pending, self.sim.history)
        except jobs.BadQuery as error:
            return _json({"error": str(error)}, 400)
        return _json(answer)

    async def get_job(self, request: web.Request) -> web.Response:
        running, pending = self._queue_items()
        job = jobs.find_job(request.match_info["job_id"], running, pending, self.sim.history)
        return _json(job) if job is not None else _json({"error": "Job not found"}, 404)

    async def post_history(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if body.get("clear"):
            self.sim.history.clear()
        for prompt_id in body.get("delete", []) if isinstance(body.get("delete"), list) else []:
            self.sim.history.pop(str(prompt_id), None)
        return web.Response(status=200)

    async def view(self, request: web.Request) -> web.StreamResponse:
        kind = request.query.get("type", "output")
        try:
            path = safe_path(
                self.sim.dirs[kind],
                request.query.get("subfolder", ""),
                request.query.get("filename", ""),
            )
        except (KeyError, ValueError):
            return web.Response(status=404)
        if not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        image = form.get("image")
        if not isinstance(image, web.FileField):
            return web.Response(status=400)
        kind = str(form.get("type", "input")) or "input"
        subfolder = str(form.get("subfolder", ""))
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        data = image.file.read()
        try:
            path = safe_path(
                self.sim.dirs.get(kind, self.sim.dirs["input"]), subfolder, image.filename
            )
        except ValueError:
            return web.Response(status=400)
        path.parent.mkdir(parents=True, exist_ok=True)
        stem, suffix, n = path.stem, path.suffix, 1
        while path.exists() and not overwrite and path.read_bytes() != data:
            path = path.with_name(f"{stem} ({n}){suffix}")
            n += 1
        path.write_bytes(data)
        return _json({"name": path.name, "subfolder": subfolder, "type": kind})

    async def object_info(self, request: web.Request) -> web.Response:
        self.sim._refresh_input_lists()
        return _json(self.sim.object_info)

    async def object_info_one(self, request: web.Request) -> web.Response:
        self.sim._refresh_input_lists()
        name = request.match_info["node_class"]
        info = self.sim.object_info.get(name)
        return _json({name: info} if info is not None else {})

    async def system_stats(self, request: web.Request) -> web.Response:
        vram = 24 * 2**30
        return _json(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 25276063744,
                    "ram_free": 23849889792,
                    "comfyui_version": self.sim.version,
                    "required_frontend_version": "1.27.10",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": platform.python_version(),
                    "pytorch_version": "2.14.1+cu130",
                    "embedded_python": False,
                    "argv": ["main.py", "--simulated"],
                },
                "devices": [
                    {
                        "name": "cuda:0 Simulated GPU : cudaMallocAsync",
                        "type": "cuda",
                        "index": 0,
                        "vram_total": vram,
                        "vram_free": vram - 2 * 2**30,
                        "torch_vram_total": 4 * 2**30,
                        "torch_vram_free": 2**30,
                    }
                ],
            }
        )

    async def features(self, request: web.Request) -> web.Response:
        return _json({"supports_preview_metadata": True, "max_upload_size": 104857600})

    async def free(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return _json(["checkpoints", "loras", "vae", "upscale_models", "embeddings"])

    async def models_in(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        lists = {
            "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
            "loras": ("LoraLoader", "lora_name"),
            "vae": ("VAELoader", "vae_name"),
            "upscale_models": ("UpscaleModelLoader", "model_name"),
        }
        if folder not in lists:
            return _json([]) if folder == "embeddings" else web.Response(status=404)
        node, name = lists[folder]
        return _json(list(self.sim.object_info[node]["input"]["required"][name][0]))

    async def embeddings(self, request: web.Request) -> web.Response:
        return _json([])

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self.sim.add_socket(sid, ws)
        try:
            await ws.send_json(status_message(self.sim.queue_remaining(), sid))
            async for message in ws:
                if message.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break  # feature_flags and other client messages need no answer
        finally:
            self.sim.remove_socket(sid, ws)
        return ws

    async def control_runs(self, request: web.Request) -> web.Response:
        runs = [
            {
                "prompt_id": r.prompt_id,
                "received": r.received,
                "started": r.started,
                "ended": r.ended,
            }
            for r in self.sim.runs
        ]
        return _json({"runs": runs})

    async def control_requests(self, request: web.Request) -> web.Response:
        return _json({"requests": [[m, p] for m, p in self.sim.requests]})

    async def control_faults(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if "oom" in body:
            self.sim.inject_oom(
                body["oom"].get("node", "KSampler"), int(body["oom"].get("times", 1))
            )
        if "http_error" in body:
            spec = body["http_error"]
            self.sim.fail_http(
                int(spec.get("status", 500)),
                int(spec.get("times", 1)),
                tuple(spec.get("paths", ())),
            )
        if "hang" in body:
            self.sim.set_hang(bool(body["hang"]))
        if "step_seconds" in body:
            self.sim.set_step_seconds(float(body["step_seconds"]))
        if body.get("drop_websockets"):
            await self.sim.drop_websockets()
        if body.get("restart"):
            await self.sim.restart()
        return _json({"ok": True})


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read())
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
