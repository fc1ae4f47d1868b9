"""Plumbing shared by the fuzz suites: running hypothesis against servers that
live on the test's event loop, reading gRPC outcomes, and proving that a
rejected call wrote nothing.

Hypothesis cannot drive an async test, and a sync `@given` body run on the
loop's own thread would block the very servers it calls. So each property is
a sync function run in a worker thread (`fuzz`), and every example hands its
calls back to the loop (`Bridge.run`) and waits for them there.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from services.errors import DOMAIN

T = TypeVar("T")

UNSHRUNK = [Phase.explicit, Phase.reuse, Phase.generate]
# Reproducible in CI (derandomize: a fixed seed, no example database), no
# per-example deadline (a call may wait on the database), and the health
# checks that only complain about slow or large examples are off: hostile
# input is large and slow on purpose.
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # Shrinking hundreds of slow calls can outlast the test's time limit; a
    # failing case says what it sent (see `described`). LOCKN_FUZZ_SHRINK=1
    # shrinks while debugging.
    phases=list(Phase) if os.environ.get("LOCKN_FUZZ_SHRINK") == "1" else UNSHRUNK,
    verbosity=Verbosity.quiet,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

# What a hostile call may answer. INTERNAL and UNKNOWN mean the server did
# not understand its own failure; those are the bugs the fuzzing looks for.
REJECTIONS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
CALL_SECONDS = 30.0


def scaled(examples: int) -> int:
    """`examples`, times LOCKN_FUZZ_SCALE (e.g. 0.1 while iterating, 10 for a soak)."""
    return max(1, round(examples * float(os.environ.get("LOCKN_FUZZ_SCALE", "1"))))


class Bridge:
    """Runs coroutines on the servers' loop from hypothesis' thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_SECONDS) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


async def described(case: Any, check: Awaitable[None]) -> None:
    """Await `check`; a failure (or a call that hung) names the case, cut to a
    readable length: hostile cases can be megabytes."""
    try:
        await check
    except Exception as error:
        what = str(error) if isinstance(error, AssertionError) else repr(error)
        raise AssertionError(f"{clip(repr(case), 600)}\n-> {clip(what, 1200)}") from None


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# Cases per hypothesis example: hypothesis' own overhead per example is about
# what a whole call costs, so cases travel in batches (a list, which shrinks).
BATCH = 10


async def fuzz(
    values: st.SearchStrategy[T],
    check: Callable[[T], Awaitable[None]],
    *,
    examples: int,
    state: Callable[[], Awaitable[object]],
) -> int:
    """Check about `examples` (times LOCKN_FUZZ_SCALE) values drawn from
    `values`, a batch at a time, and after each batch that `state()` (all a
    call could write) is unchanged. Returns how many cases ran."""
    bridge = Bridge(asyncio.get_running_loop())
    before = await state()
    wanted = scaled(examples)
    ran = 0

    async def batch(cases: list[T]) -> None:
        nonlocal ran
        # All at once, as hostile clients would send them; every call ends
        # before a failure is reported, so no call outlives its example.
        results = await asyncio.gather(
            *(described(c, check(c)) for c in cases), return_exceptions=True
        )
        ran += len(cases)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        # A write does not undo itself: one look per batch covers each call.
        assert await state() == before, "a call changed what it must not"

    @settings(FUZZ_SETTINGS, max_examples=max(1, wanted // BATCH))
    @given(st.lists(values, min_size=BATCH // 2, max_size=BATCH * 3 // 2))
    def property_holds(cases: list[T]) -> None:
        bridge.run(batch(cases))

    # Off the loop, which keeps serving the calls each example hands back.
    await asyncio.to_thread(property_holds)
    assert ran >= wanted // 2, f"only {ran} of {wanted} cases ran"
    return ran


# ----- outcomes --------------------------------------------------------------------


@dataclass
class Outcome:
    """How one call ended: OK with its responses, or a status and its details."""

    code: grpc.StatusCode
    message: str = ""
    responses: list[Any] = field(default_factory=list)
    reason: str | None = None
    violations: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} {self.message[:300]!r} {self.violations[:4]}"


def _failed(error: grpc.aio.AioRpcError) -> Outcome:
    outcome = Outcome(error.code(), error.details() or "")
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        # Details whose code disagrees with the call's: the status was
        # replaced on the way (e.g. trailers too large). Report it as is.
        return outcome
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            assert info.domain == DOMAIN, info
            outcome.reason = info.reason
        elif detail.Unpack(bad):
            outcome.violations = [(v.field, v.description) for v in bad.field_violations]
    return outcome


async def unary(call: Awaitable[Any]) -> Outcome:
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        return _failed(error)
    return Outcome(grpc.StatusCode.OK, responses=[response])


async def streamed(call: AsyncIterator[Any], seconds: float = 10.0) -> Outcome:
    """Every response of a stream that must end by itself within `seconds`."""
    responses: list[Any] = []
    try:
        async with asyncio.timeout(seconds):
            async for response in call:
                responses.append(response)
    except grpc.aio.AioRpcError as error:
        failed = _failed(error)
        failed.responses = responses
        return failed
    return Outcome(grpc.StatusCode.OK, responses=responses)


def assert_rejected(
    outcome: Outcome,
    fields: Collection[str] = (),
    codes: Collection[grpc.StatusCode] = REJECTIONS,
) -> None:
    """A clean refusal: an expected code with our ErrorInfo, and an
    INVALID_ARGUMENT naming one of `fields` (a violation's field, or the
    start of one: "input_images" covers "input_images[0].data")."""
    assert outcome.code in codes, f"expected one of {sorted(c.name for c in codes)}: {outcome}"
    assert outcome.reason, f"no ErrorInfo reason: {outcome}"
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert outcome.violations, f"no field violations: {outcome}"
        named = [name for name, _ in outcome.violations]
        if fields:
            assert any(names_field(n, f) for n in named for f in fields), (
                f"expected a violation of {sorted(fields)}: {outcome}"
            )


def names_field(named: str, expected: str) -> bool:
    """`named` (a violation's field) is `expected` or inside it, or, clipped
    to the status budget (services.errors.clip), the start of it."""
    if named.startswith(expected):
        return True
    return named.endswith("...") and expected.startswith(named[:-3])


def assert_not_broken(outcome: Outcome) -> None:
    """Whatever the answer, it is never the server's own failure."""
    assert outcome.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), str(outcome)


# ----- side effects ----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything a GenerationService call could write: the three queue tables
    (row counts, and the columns a write would change) and the image store."""

    rows: tuple[int, int, int]
    fingerprint: str
    files: tuple[tuple[str, int], ...]


async def snapshot(db: asyncpg.Connection, store: Path) -> Snapshot:
    row = await db.fetchrow(
        """
        SELECT (SELECT count(*) FROM generations) AS generations,
               (SELECT count(*) FROM generation_events) AS events,
               (SELECT count(*) FROM generation_inputs) AS inputs,
               (SELECT coalesce(md5(string_agg(
                    concat_ws('|', id, status, last_event_seq, cancel_requested, attempts,
                              worker, prompt_id, request_id),
                    ',' ORDER BY id)), '') FROM generations) AS fingerprint
        """
    )
    files = tuple(sorted((entry.name, entry.stat().st_size) for entry in os.scandir(store)))
    return Snapshot((row["generations"], row["events"], row["inputs"]), row["fingerprint"], files)
