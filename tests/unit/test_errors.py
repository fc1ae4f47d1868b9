"""Error statuses stay small enough to arrive as themselves, whatever they quote."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

from services.errors import (
    TRAILER_BYTES,
    InvalidArgument,
    NotFound,
    to_rpc_status,
    trailer_bytes,
)

HUGE = 'é"%\n' * 50_000  # expands most when percent-encoded


def encoded_size(error: Exception) -> int:
    status = to_rpc_status(error)  # type: ignore[arg-type]
    (details,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return trailer_bytes(status_pb2.Status.FromString(details))


def test_huge_quoted_input_is_clipped_under_the_trailer_budget() -> None:
    error = InvalidArgument([(f"parameters.{HUGE}", HUGE) for _ in range(20)])
    error.message = HUGE
    assert encoded_size(error) <= TRAILER_BYTES < 8 * 1024
    status = status_pb2.Status.FromString(
        dict(to_rpc_status(error).trailing_metadata)["grpc-status-details-bin"]
    )
    assert status.message.endswith("...")


def test_long_metadata_is_clipped_too() -> None:
    error = NotFound("no such model", metadata={f"k{n}": HUGE for n in range(40)})
    assert encoded_size(error) <= TRAILER_BYTES


def test_a_small_error_is_left_whole() -> None:
    error = InvalidArgument([("parameters.steps", "must be at most 150 (got 1000)")])
    status = status_pb2.Status.FromString(
        dict(to_rpc_status(error).trailing_metadata)["grpc-status-details-bin"]
    )
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    (violation,) = bad.field_violations
    assert (violation.field, violation.description) == (
        "parameters.steps",
        "must be at most 150 (got 1000)",
    )
