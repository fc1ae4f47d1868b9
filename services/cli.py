"""`lockn-gen`: the one command that starts each process and drives the service.

Each subcommand imports its process lazily, so `lockn-gen migrate` does not
pay for the gateway's imports. A bad setting or an unreachable database ends
the process with exit status 2 and one line naming the cause.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc

from services import event_loop
from services.database import DatabaseUnreachable, connect, migrate, pending
from services.errors import LocknError, NotFound, from_rpc_error
from services.log import configure_logging
from services.settings import Settings, SettingsError, load_settings

# subcommand -> (module, function taking (settings, args), help)
PROCESSES: dict[str, tuple[str, str, str]] = {
    "generation-service": ("services.generation.server", "serve", "run GenerationService"),
    "comfy-worker": ("services.comfy_worker.server", "serve", "run a ComfyWorker"),
    "gateway": ("gateway.server", "serve", "run the HTTP/JSON gateway"),
}


async def _migrate(settings: Settings, args: argparse.Namespace) -> None:
    if args.pending:
        for version, no_transaction in await pending(settings.database_dsn):
            note = "  (no transaction: builds an index concurrently)" if no_transaction else ""
            print(version + note)
        return
    applied = await migrate(settings.database_dsn)
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


async def _check_database(settings: Settings, args: argparse.Namespace) -> None:
    await (await connect(settings.database_dsn)).close()
    print("database reachable")


async def _probe(settings: Settings, args: argparse.Namespace) -> None:
    """Exit 0 when the gRPC health service at --address says SERVING (container healthchecks)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.grpc_server import open_channel

    async with open_channel(args.address, tls=settings.tls) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # The health service answers an unknown name with no message at all.
            raise NotFound(
                f"{args.address} reports no health for service {args.service!r}",
                reason=error.code().name,
            ) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(1)


def _lazy(module: str, function: str) -> Callable[[Settings, argparse.Namespace], Any]:
    def run(settings: Settings, args: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(module), function)(settings, args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lockn-gen", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The services run on uvloop when installed; the rest (the simulator, a
    # stand-in for ComfyUI, among them) on the standard loop.
    parser.set_defaults(loop=asyncio.run)
    for name, (module, function, help_text) in PROCESSES.items():
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(run=_lazy(module, function), loop=event_loop.run)
    sub = commands.add_parser("migrate", help="apply database migrations")
    sub.add_argument(
        "--pending", action="store_true", help="list the migrations not yet applied; apply none"
    )
    sub.set_defaults(run=_migrate)
    sub = commands.add_parser("check-database", help="check that DATABASE_URL answers")
    sub.set_defaults(run=_check_database)
    sub = commands.add_parser("probe", help="check a service's gRPC health (exit 0 if SERVING)")
    sub.add_argument("--address", required=True, help="host:port of the service")
    sub.add_argument("--service", default="", help="service name; empty for the server overall")
    sub.add_argument("--timeout", type=float, default=3.0)
    sub.set_defaults(run=_probe)
    _add_simulator(commands)
    _add_extensions(commands)
    return parser


def _add_simulator(commands: Any) -> None:
    sub = commands.add_parser("simulate-comfyui", help="run the ComfyUI simulator")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8188)
    sub.add_argument("--step-seconds", type=float, default=0.05, help="time per sampler step")
    sub.add_argument(
        "--jobs-api",
        action="store_true",
        help="behave as a newer ComfyUI serving /api/jobs (default: the recorded 0.3.64)",
    )
    sub.add_argument(
        "--assign-prompt-ids",
        action="store_true",
        help="ignore client-chosen prompt ids, as releases before them did",
    )
    sub.set_defaults(run=_lazy("services.simulator.server", "serve"))


def _add_extensions(commands: Any) -> None:
    """Client subcommands (generate, list, ..., demo) register themselves here."""
    for module in ("services.client_cli", "services.demo"):
        try:
            register = importlib.import_module(module).register
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
            continue
        register(commands)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        result = args.run(settings, args)
        if isinstance(result, Coroutine):
            result = args.loop(result)
    except (SettingsError, DatabaseUnreachable) as error:
        print(f"lockn-gen: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (grpc.RpcError, LocknError) as caught:
        # A refusal from a server reads like one of ours: its stable reason, once.
        failure = caught if isinstance(caught, LocknError) else from_rpc_error(caught)
        print(f"error: {failure.reason}: {failure.message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
