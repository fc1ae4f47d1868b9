"""A bare grpc.aio server as the yardstick for status fan-out.

It serves WatchGeneration from the same contract and nothing else: a snapshot
to each watcher, then every event a trigger publishes, written to every
stream as it comes. No database, no hub, no interceptor, no other work, on
the services' loop and garbage collector tuning: what
grpc.aio itself costs per delivery on this machine, for the same messages to
the same number of streams on one channel. The fan-out scenario measures it
right after GenerationService, with the same watchers, so the two figures
compare like with like.

Run as a process (`python -m bench.grpc_floor`): it prints its port, then
serves until killed. CancelGeneration is its trigger: each call publishes one
event, stamped with the time it was published.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from services import collector, event_loop
from services.contracts import gen, gen_grpc


class FloorServicer(gen_grpc.GenerationServiceServicer):
    def __init__(self) -> None:
        self.sequence = 0
        self._next: asyncio.Future[gen.GenerationEvent] = asyncio.get_running_loop().create_future()

    async def WatchGeneration(
        self, request: gen.WatchGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen.WatchGenerationResponse]:
        yield gen.WatchGenerationResponse(snapshot=gen.Generation(id=request.id))
        while True:
            event = await self._next
            yield gen.WatchGenerationResponse(event=event)

    async def CancelGeneration(
        self, request: gen.CancelGenerationRequest, context: grpc.aio.ServicerContext
    ) -> gen.CancelGenerationResponse:
        self.sequence += 1
        event = gen.GenerationEvent(generation_id=request.id, sequence=self.sequence)
        event.time.GetCurrentTime()
        published, self._next = self._next, asyncio.get_running_loop().create_future()
        published.set_result(event)
        return gen.CancelGenerationResponse()


async def serve() -> None:
    server = grpc.aio.server()
    # Only the two methods the scenario calls; gRPC answers UNIMPLEMENTED for the rest.
    servicer = FloorServicer()  # type: ignore[abstract]
    gen_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    collector.tune_for_service()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    # The same loop as the services, so the floor compares like with like.
    sys.exit(event_loop.run(serve()))
