"""`lockn-gen simulate-comfyui`: the simulator as a process, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

from services.log import get_logger
from services.settings import Settings
from services.simulator.app import SimulatorOptions, create_app, shutdown

log = get_logger(component="simulator")


async def serve(settings: Settings, args: argparse.Namespace) -> None:
    options = SimulatorOptions(
        step_seconds=args.step_seconds,
        jobs_api=args.jobs_api,
        client_prompt_ids=not args.assign_prompt_ids,
    )
    app = create_app(options)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    log.info("simulator_started", url=f"http://{args.host}:{args.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await shutdown(runner)
