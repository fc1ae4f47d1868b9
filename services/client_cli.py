"""The client subcommands of `lockn-gen`: generate (with live progress), list,
get, cancel, templates, stats. They talk gRPC to LOCKN_GENERATION_ADDRESS with
LOCKN_CLIENT_TOKEN; `--json` prints machine-readable output for scripts. A
refusal from the service, a bad argument or a generation that fails while
watched ends the command through `services.cli.main`, which prints the one
line `error: REASON: message` and exits with status 2."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from gateway.convert import parameter, statuses, to_json
from services.contracts import gen, gen_grpc
from services.grpc_server import bearer, open_channel
from services.settings import Settings

TERMINAL = {
    gen.GENERATION_STATUS_COMPLETED,
    gen.GENERATION_STATUS_FAILED,
    gen.GENERATION_STATUS_CANCELLED,
}


@asynccontextmanager
async def _client(
    settings: Settings,
) -> AsyncIterator[tuple[gen_grpc.GenerationServiceStub, list[tuple[str, str]]]]:
    token = settings.client_token.get_secret_value() if settings.client_token else None
    async with open_channel(settings.generation_address, tls=settings.tls) as channel:
        yield gen_grpc.GenerationServiceStub(channel), bearer(token)


def _value(text: str) -> Any:
    """`--param k=v`: JSON when it parses (numbers, booleans), else the text as is."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


async def generate(settings: Settings, args: argparse.Namespace) -> int:
    values: dict[str, Any] = {"prompt": args.prompt}
    for pair in args.param:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param {pair!r}: expected key=value")
        values[key] = _value(value)
    request = gen.CreateGenerationRequest(
        template=args.template, priority=args.priority, request_id=args.request_id or ""
    )
    for name, value in values.items():
        request.parameters[name].CopyFrom(parameter(name, value))
    async with _client(settings) as (stub, metadata):
        created = (await stub.CreateGeneration(request, metadata=metadata)).generation
        if not args.watch:
            _print(args, to_json(created), f"{created.id} {_where(created)}")
            return 0
        final = await _follow(stub, metadata, created, quiet=args.json)
    if args.json:
        print(json.dumps(to_json(final), indent=2))
    elif final.status == gen.GENERATION_STATUS_COMPLETED:
        for output in final.outputs:
            print(output.path)
    else:
        print(
            f"{gen.GenerationStatus.Name(final.status)}: {final.error.reason} {final.error.message}"
        )
    return 0 if final.status == gen.GENERATION_STATUS_COMPLETED else 1


async def _follow(
    stub: gen_grpc.GenerationServiceStub,
    metadata: list[tuple[str, str]],
    created: gen.Generation,
    quiet: bool,
) -> gen.Generation:
    console = Console(stderr=True, quiet=quiet)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(_where(created), total=None)
        call = stub.WatchGeneration(gen.WatchGenerationRequest(id=created.id), metadata=metadata)
        async for item in call:
            if item.HasField("snapshot"):
                snapshot = item.snapshot
                if snapshot.status == gen.GENERATION_STATUS_QUEUED:
                    position = snapshot.queue_position
                    progress.update(task, description=f"queued (position {position})")
                continue
            event = item.event
            status = gen.GenerationStatus.Name(event.status).removeprefix("GENERATION_STATUS_")
            if event.HasField("progress") and event.progress.max:
                progress.update(
                    task,
                    description=f"{status.lower()} step",
                    completed=event.progress.value,
                    total=event.progress.max,
                )
            else:
                progress.update(task, description=status.lower())
    reply = await stub.GetGeneration(gen.GetGenerationRequest(id=created.id), metadata=metadata)
    final: gen.Generation = reply.generation
    return final


def _where(created: gen.Generation) -> str:
    """Where a new generation stands: waiting in line, or already sent to a
    free worker by its create."""
    if created.status == gen.GENERATION_STATUS_QUEUED:
        return f"queued (position {created.queue_position})"
    return f"dispatched to {created.worker}"


async def list_generations(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.ListGenerations(
            gen.ListGenerationsRequest(
                page_size=args.limit, statuses=statuses(args.status or ""), page_token=args.page
            ),
            metadata=metadata,
        )
    lines = [
        f"{g.id}  {gen.GenerationStatus.Name(g.status).removeprefix('GENERATION_STATUS_'):<10}"
        f"  {g.template}  {g.create_time.ToDatetime():%Y-%m-%d %H:%M:%S}"
        for g in reply.generations
    ]
    if reply.next_page_token:
        lines.append(f"more: --page {reply.next_page_token}")
    _print(args, to_json(reply), "\n".join(lines) or "no generations")
    return 0


async def get(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.GetGeneration(gen.GetGenerationRequest(id=args.id), metadata=metadata)
    data = to_json(reply.generation)
    _print(args, data, json.dumps(data, indent=2))
    return 0


async def cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.CancelGeneration(
            gen.CancelGenerationRequest(id=args.id), metadata=metadata
        )
    status = gen.GenerationStatus.Name(reply.generation.status).removeprefix("GENERATION_STATUS_")
    _print(args, to_json(reply.generation), f"{args.id}: {status.lower()}")
    return 0


async def templates(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.ListTemplates(gen.ListTemplatesRequest(), metadata=metadata)
    lines = []
    for template in reply.templates:
        lines.append(f"{template.name}: {template.description}")
        for spec in template.parameters:
            kind = gen.ParameterType.Name(spec.type).removeprefix("PARAMETER_TYPE_").lower()
            lines.append(f"    {spec.name} ({kind}{', required' if spec.required else ''})")
    _print(args, to_json(reply), "\n".join(lines))
    return 0


async def stats(settings: Settings, args: argparse.Namespace) -> int:
    async with _client(settings) as (stub, metadata):
        reply = await stub.GetStats(gen.GetStatsRequest(), metadata=metadata)
    lines = [
        f"{gen.GenerationStatus.Name(c.status).removeprefix('GENERATION_STATUS_').lower():<10}"
        f" {c.count}"
        for c in reply.queue
    ]
    lines += [
        f"worker {w.name} ({w.address}): {'serving' if w.serving else 'NOT serving'}, "
        f"{w.slots_used}/{w.slots_total} slots"
        for w in reply.workers
    ]
    if reply.dispatch_paused:
        lines.append(f"dispatch paused: {reply.pause_reason}")
    _print(args, to_json(reply), "\n".join(lines))
    return 0


def _command(commands: Any, name: str, text: str, handler: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=text)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=handler)
    return parser


def register(commands: Any) -> None:
    sub = _command(commands, "generate", "create a generation and follow it", generate)
    sub.add_argument("prompt")
    sub.add_argument("--template", default="sd15-txt2img")
    sub.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    sub.add_argument("--priority", type=int, default=0)
    sub.add_argument("--request-id")
    sub.add_argument("--watch", action=argparse.BooleanOptionalAction, default=True)
    sub = _command(commands, "list", "list your generations, newest first", list_generations)
    sub.add_argument("--status", help="comma-separated, e.g. queued,running")
    sub.add_argument("--limit", type=int, default=20)
    sub.add_argument("--page", default="")
    _command(commands, "get", "show one generation", get).add_argument("id")
    _command(commands, "cancel", "cancel a generation", cancel).add_argument("id")
    _command(commands, "templates", "templates and their parameters", templates)
    _command(commands, "stats", "queue and worker state", stats)
