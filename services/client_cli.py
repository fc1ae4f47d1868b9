"""The client subcommands of `lockn-gen`: generate (with live progress), list,
get, cancel, templates, stats. They talk gRPC to LOCKN_GENERATION_ADDRESS with
LOCKN_CLIENT_TOKEN; `--json` prints machine-readable output for scripts. A
refusal from the service, a bad argument or a generation that fails while
watched ends the command through `services.cli.main`, which prints the one
line `error: REASON: message` and exits with status 2."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from gateway.convert import parameter, statuses, to_json
from services.contracts import gen, gen_grpc
from services.errors import InvalidArgument, LocknError
from services.grpc_server import bearer, open_channel
from services.settings import Settings

QUEUED = gen.GENERATION_STATUS_QUEUED
COMPLETED = gen.GENERATION_STATUS_COMPLETED
CANCELLED = gen.GENERATION_STATUS_CANCELLED
# ParameterSpec.type values whose --param text is the value itself.
TEXT_TYPES = {gen.PARAMETER_TYPE_STRING, gen.PARAMETER_TYPE_ENUM}
UINT32_MAX = 2**32 - 1


@asynccontextmanager
async def _client(
    settings: Settings,
) -> AsyncIterator[tuple[gen_grpc.GenerationServiceStub, list[tuple[str, str]]]]:
    token = settings.client_token.get_secret_value() if settings.client_token else None
    async with open_channel(settings.generation_address, tls=settings.tls) as channel:
        yield gen_grpc.GenerationServiceStub(channel), bearer(token)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _status(status: gen.GenerationStatus.ValueType) -> str:
    """`completed`, `queued`, ...: the words the JSON output uses too."""
    return gen.GenerationStatus.Name(status).removeprefix("GENERATION_STATUS_").lower()


def _time(stamp: Timestamp) -> str:
    return f"{stamp.ToDatetime():%Y-%m-%d %H:%M:%S}"


# ----- generate ----------------------------------------------------------------------


async def generate(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        request = await _create_request(stub, metadata, args)
        created = (await stub.CreateGeneration(request, metadata=metadata)).generation
        if not args.watch:
            _print(args, to_json(created), f"{created.id} {WatchLine.of(created).description}")
            return 0
        # On stderr, so that stdout stays the image paths (or the JSON).
        print(f"generation {created.id}", file=sys.stderr)
        try:
            final = await _follow(stub, metadata, created, quiet=args.json)
        except (asyncio.CancelledError, KeyboardInterrupt):
            # Ctrl-C stops the watch, not the generation: say how to reach it.
            print(
                f"stopped watching; generation {created.id} keeps running"
                f" (lockn-gen cancel {created.id} cancels it)",
                file=sys.stderr,
            )
            raise
    if args.json:
        print(json.dumps(to_json(final), indent=2))
    if final.status == COMPLETED:
        if not args.json:
            for output in final.outputs:
                print(output.path)
        return 0
    if final.status == CANCELLED:
        raise LocknError(
            final.error.message or f"generation {final.id} was cancelled",
            reason=final.error.reason or "CANCELLED",
        )
    raise LocknError(
        final.error.message or f"generation {final.id} failed",
        reason=final.error.reason or "FAILED",
    )


async def _create_request(
    stub: gen_grpc.GenerationServiceStub,
    metadata: list[tuple[str, str]],
    args: argparse.Namespace,
) -> gen.CreateGenerationRequest:
    """The request the arguments describe; each parameter given once (the
    prompt argument, --image and --param all name parameters)."""
    request = gen.CreateGenerationRequest(
        template=args.template,
        priority=args.priority,
        request_id=args.request_id or "",
        timeout_seconds=args.timeout,
    )
    given: dict[str, str] = {}

    def put(name: str, value: gen.ParameterValue, source: str) -> None:
        if name in given:
            raise InvalidArgument.field(
                f"parameters.{name}", f"given twice, as {given[name]} and as {source}; give one"
            )
        given[name] = source
        request.parameters[name].CopyFrom(value)

    if args.prompt is not None:
        put("prompt", gen.ParameterValue(string_value=args.prompt), "the PROMPT argument")
    for text in args.image:
        name, path = _pair("--image", text)
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
        except OSError as error:
            raise InvalidArgument.field("--image", f"{path}: {error.strerror}") from None
        request.input_images.append(gen.InputImage(name=name, data=data))
        put(name, gen.ParameterValue(image_name=name), f"--image {text}")
    if args.param:
        specs = await _parameter_specs(stub, metadata, args.template)
        for text in args.param:
            name, value = _pair("--param", text)
            put(name, _typed(name, value, specs.get(name)), f"--param {text}")
    return request


def _pair(option: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise InvalidArgument.field(option, f"{text!r}: expected NAME=VALUE")
    return name, value


async def _parameter_specs(
    stub: gen_grpc.GenerationServiceStub, metadata: list[tuple[str, str]], template: str
) -> dict[str, gen.ParameterSpec]:
    """The template's declared parameters by name; none for an unknown template
    (CreateGeneration then names it)."""
    reply = await stub.ListTemplates(gen.ListTemplatesRequest(), metadata=metadata)
    for found in reply.templates:
        if found.name == template:
            return {spec.name: spec for spec in found.parameters}
    return {}


def _typed(name: str, text: str, spec: gen.ParameterSpec | None) -> gen.ParameterValue:
    """`--param NAME=TEXT` as the template declares NAME. Text that is not of
    the declared type, or a parameter the template does not declare, goes as
    its guessed JSON type, for GenerationService to refuse naming the field."""
    kind = spec.type if spec is not None else gen.PARAMETER_TYPE_UNSPECIFIED
    if kind in TEXT_TYPES:
        return gen.ParameterValue(string_value=text)
    if kind == gen.PARAMETER_TYPE_IMAGE:
        return gen.ParameterValue(image_name=text)
    if kind == gen.PARAMETER_TYPE_BOOLEAN and text.lower() in ("true", "false"):
        return gen.ParameterValue(bool_value=text.lower() == "true")
    try:
        if kind == gen.PARAMETER_TYPE_INTEGER:
            return gen.ParameterValue(int_value=int(text))
        if kind == gen.PARAMETER_TYPE_NUMBER:
            return gen.ParameterValue(number_value=float(text))
    except ValueError:  # not a number, or outside int64
        pass
    return parameter(name, _guess(text))


def _guess(text: str) -> Any:
    """JSON when it parses as a number or boolean, else the text as is."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


@dataclass
class WatchLine:
    """What the progress line says while a generation is followed: its state,
    the latest queue position known while it waits (events carry none), and
    the sampler's steps once a progress report gave their number."""

    status: gen.GenerationStatus.ValueType
    position: int
    worker: str = ""
    completed: int = 0
    total: int = 0

    @classmethod
    def of(cls, generation: gen.Generation) -> WatchLine:
        line = cls(generation.status, generation.queue_position)
        line._seen(generation.status, generation.worker, generation.progress)
        return line

    def apply(self, item: gen.WatchGenerationResponse) -> None:
        if item.HasField("snapshot"):
            snapshot = item.snapshot
            if snapshot.status == QUEUED:
                self.position = snapshot.queue_position
            self._seen(snapshot.status, snapshot.worker, snapshot.progress)
        else:
            self._seen(item.event.status, item.event.worker, item.event.progress)

    def _seen(
        self, status: gen.GenerationStatus.ValueType, worker: str, progress: gen.Progress
    ) -> None:
        self.status = status
        self.worker = worker or self.worker
        if progress.max:
            self.completed, self.total = progress.value, progress.max

    @property
    def description(self) -> str:
        if self.status == QUEUED:
            return f"queued (position {self.position})"
        if self.status == gen.GENERATION_STATUS_DISPATCHED and self.worker:
            return f"dispatched to {self.worker}"
        running = self.status == gen.GENERATION_STATUS_RUNNING
        return _status(self.status) + (" step" if running and self.total else "")

    @property
    def steps(self) -> str:
        return f"{self.completed}/{self.total}" if self.total else ""


async def _follow(
    stub: gen_grpc.GenerationServiceStub,
    metadata: list[tuple[str, str]],
    created: gen.Generation,
    quiet: bool,
) -> gen.Generation:
    console = Console(stderr=True, quiet=quiet)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[steps]}"))
    line = WatchLine.of(created)
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(line.description, total=None, steps=line.steps)
        call = stub.WatchGeneration(gen.WatchGenerationRequest(id=created.id), metadata=metadata)
        async for item in call:
            line.apply(item)
            progress.update(
                task,
                description=line.description,
                completed=line.completed,
                total=line.total or None,
                steps=line.steps,
            )
    reply = await stub.GetGeneration(gen.GetGenerationRequest(id=created.id), metadata=metadata)
    final: gen.Generation = reply.generation
    return final


# ----- the other commands ------------------------------------------------------------


def _list_line(generation: gen.Generation) -> str:
    return (
        f"{generation.id}  {_status(generation.status):<10}  {generation.template}"
        f"  {_time(generation.create_time)}"
    )


async def list_generations(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.ListGenerations(
            gen.ListGenerationsRequest(
                page_size=args.limit,
                statuses=statuses(args.status or ""),
                page_token=args.page,
                template=args.template or "",
            ),
            metadata=metadata,
        )
    lines = [_list_line(g) for g in reply.generations]
    if reply.next_page_token:
        lines.append(f"more: --page {reply.next_page_token}")
    _print(args, to_json(reply), "\n".join(lines) or "no generations")
    return 0


def _summary(generation: gen.Generation) -> str:
    """`get` without --json: what a person looks for, in `list`'s words."""
    g = generation
    lines = [
        f"id        {g.id}",
        f"status    {_status(g.status)}",
        f"template  {g.template}",
        f"created   {_time(g.create_time)}",
    ]
    if g.status == QUEUED:
        lines.append(f"position  {g.queue_position}")
    elif g.progress.max:
        lines.append(f"step      {g.progress.value}/{g.progress.max}")
    if g.HasField("complete_time"):
        took = f" ({g.duration_ms / 1000:.1f} s)" if g.duration_ms else ""
        lines.append(f"finished  {_time(g.complete_time)}{took}")
    lines += [f"output    {output.path}" for output in g.outputs]
    if g.error.reason:
        lines.append(f"error     {g.error.reason}: {g.error.message}")
    return "\n".join(lines)


async def get(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.GetGeneration(gen.GetGenerationRequest(id=args.id), metadata=metadata)
    _print(args, to_json(reply.generation), _summary(reply.generation))
    return 0


async def cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.CancelGeneration(
            gen.CancelGenerationRequest(id=args.id), metadata=metadata
        )
    _print(args, to_json(reply.generation), f"{args.id}: {_status(reply.generation.status)}")
    return 0


def _spec_line(spec: gen.ParameterSpec) -> str:
    """`steps (integer, default 20, 1..150): Denoising steps.`"""
    facts = [gen.ParameterType.Name(spec.type).removeprefix("PARAMETER_TYPE_").lower()]
    if spec.required:
        facts.append("required")
    kind = spec.default_value.WhichOneof("kind")
    if kind is not None:
        facts.append(f"default {json.dumps(getattr(spec.default_value, kind))}")
    if spec.HasField("minimum") or spec.HasField("maximum"):
        low = _bound(spec.minimum) if spec.HasField("minimum") else ""
        high = _bound(spec.maximum) if spec.HasField("maximum") else ""
        facts.append(f"{low}..{high}")
    if spec.choices:
        facts.append(f"one of: {', '.join(spec.choices)}")
    text = f"{spec.name} ({', '.join(facts)})"
    return f"{text}: {spec.description}" if spec.description else text


def _bound(value: float) -> str:
    """150, 0.5; past 2^53 a double no longer holds every integer, so 1.84467e+19."""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else f"{value:g}"


async def templates(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.ListTemplates(gen.ListTemplatesRequest(), metadata=metadata)
    lines = []
    for template in reply.templates:
        lines.append(f"{template.name}: {template.description}")
        lines += [f"    {_spec_line(spec)}" for spec in template.parameters]
    _print(args, to_json(reply), "\n".join(lines))
    return 0


async def stats(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.GetStats(gen.GetStatsRequest(), metadata=metadata)
    lines = [f"{_status(c.status):<10} {c.count}" for c in reply.queue]
    lines += [
        f"worker {w.name} ({w.address}): {'serving' if w.serving else 'NOT serving'}, "
        f"{w.slots_used}/{w.slots_total} slots"
        for w in reply.workers
    ]
    if reply.dispatch_paused:
        lines.append(f"dispatch paused: {reply.pause_reason}")
    _print(args, to_json(reply), "\n".join(lines))
    return 0


# ----- arguments ---------------------------------------------------------------------


def _seconds(text: str) -> int:
    """--timeout: what CreateGenerationRequest.timeout_seconds (a uint32) holds."""
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 0 <= seconds <= UINT32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and {UINT32_MAX}")
    return seconds


def _command(commands: Any, name: str, text: str, handler: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=text)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=handler)
    return parser


def register(commands: Any) -> None:
    sub = _command(commands, "generate", "create a generation and follow it", generate)
    sub.add_argument("prompt", nargs="?", help="the prompt parameter (for templates that take one)")
    sub.add_argument(
        "--template", default="sd15-txt2img", help="template name (default: %(default)s)"
    )
    sub.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template parameter, converted to its declared type; repeatable",
    )
    sub.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="upload the image file PATH as the image parameter NAME; repeatable",
    )
    sub.add_argument(
        "--priority", type=int, default=0, help="-100..100, higher runs first (default 0)"
    )
    sub.add_argument(
        "--request-id", help="idempotency key: repeating it returns the first generation"
    )
    sub.add_argument(
        "--timeout",
        type=_seconds,
        default=0,
        metavar="SECONDS",
        help="fail the generation if not done by then (default: the service's)",
    )
    sub.add_argument(
        "--watch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow progress and print the image paths (default); --no-watch prints the id",
    )
    sub = _command(commands, "list", "list your generations, newest first", list_generations)
    sub.add_argument("--status", help="comma-separated, e.g. queued,running")
    sub.add_argument("--template", help="only generations of this template")
    sub.add_argument("--limit", type=int, default=20, help="generations per page, 1..100")
    sub.add_argument("--page", default="", help="the token after 'more: --page' of the last page")
    _command(commands, "get", "show one generation", get).add_argument("id")
    _command(commands, "cancel", "cancel a generation", cancel).add_argument("id")
    _command(commands, "templates", "templates and their parameters", templates)
    _command(commands, "stats", "queue and worker state", stats)
