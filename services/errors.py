"""The error hierarchy every LockN Gen process raises, and its gRPC mapping.

Domain code raises these; the one server interceptor in `grpc_server` turns
them into a gRPC status carrying google.rpc details (ErrorInfo with a stable
reason, BadRequest field violations, RetryInfo), and `from_rpc_error` turns
such a status back into the same exception on the client side. The gateway
maps the same classes to HTTP in one place of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "lockn.gen"
# What a status may carry (see to_rpc_status). gRPC peers refuse trailers
# past 8 KiB at random and always past 16 KiB, so the encoded status stays
# under TRAILER_BYTES; the per-part budgets (UTF-8 bytes) shrink until it does.
TRAILER_BYTES = 6 * 1024
MESSAGE_BYTES = 1024
FIELD_BYTES = 128
DESCRIPTION_BYTES = 512
METADATA_BYTES = 512
MAX_VIOLATIONS = 8
MAX_METADATA = 16


class Reason(StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    TEMPLATE_NOT_FOUND = "TEMPLATE_NOT_FOUND"
    GENERATION_NOT_FOUND = "GENERATION_NOT_FOUND"
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    PROMPT_NOT_FOUND = "PROMPT_NOT_FOUND"
    NOT_COMPLETED = "NOT_COMPLETED"
    ALREADY_TERMINAL = "ALREADY_TERMINAL"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    QUEUE_LIMIT = "QUEUE_LIMIT"
    GPU_OUT_OF_MEMORY = "GPU_OUT_OF_MEMORY"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    INVALID_WORKFLOW = "INVALID_WORKFLOW"
    TIMEOUT = "TIMEOUT"
    STORAGE_FULL = "STORAGE_FULL"
    EXECUTION_ERROR = "EXECUTION_ERROR"
    INTERRUPTED = "INTERRUPTED"
    COMFYUI_UNREACHABLE = "COMFYUI_UNREACHABLE"
    PROMPT_LOST = "PROMPT_LOST"
    ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    LEASE_LOST = "LEASE_LOST"
    INTERNAL = "INTERNAL"


class LocknError(Exception):
    """Base of every error with a stable reason; never carries secrets."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: Reason = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason.value
        self.metadata = dict(metadata or {})


class InvalidArgument(LocknError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = Reason.INVALID_ARGUMENT

    def __init__(
        self,
        violations: Sequence[tuple[str, str]],
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        text = "; ".join(f"{field}: {why}" for field, why in violations)
        super().__init__(text, reason=reason, metadata=metadata)
        self.violations = list(violations)

    @classmethod
    def field(cls, field: str, why: str) -> InvalidArgument:
        return cls([(field, why)])


class NotFound(LocknError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = Reason.GENERATION_NOT_FOUND


class FailedPrecondition(LocknError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = Reason.ALREADY_TERMINAL


class AlreadyExists(LocknError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = Reason.REQUEST_ID_REUSED


class Unauthenticated(LocknError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = Reason.UNAUTHENTICATED


class PermissionDenied(LocknError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = Reason.UNAUTHENTICATED


class ResourceExhausted(LocknError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = Reason.QUEUE_LIMIT

    def __init__(self, message: str, *, retry_after_seconds: float = 5.0, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after_seconds = retry_after_seconds


class Unavailable(LocknError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = Reason.COMFYUI_UNREACHABLE


class DeadlineExceeded(LocknError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = Reason.TIMEOUT


_BY_CODE: dict[grpc.StatusCode, type[LocknError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
    )
}


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (whole characters), marked when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def to_rpc_status(error: LocknError) -> grpc.Status:
    """The gRPC status (with google.rpc details) that stands for `error`.

    Messages, violations and metadata often quote the caller's input (or long
    model lists); they travel in trailing metadata, which a peer refuses past
    8 KiB at random and past 16 KiB always (the caller then sees
    RESOURCE_EXHAUSTED instead). So each part is clipped, and the budgets are
    halved until the encoded trailers fit, however long the input was.
    """
    share = 1.0
    status = _status(error, share)
    while trailer_bytes(status) > TRAILER_BYTES and share > 1 / 64:
        share /= 2
        status = _status(error, share)
    return rpc_status.to_status(status)


def trailer_bytes(status: status_pb2.Status) -> int:
    """The size of grpc-message (percent-encoded) and grpc-status-details-bin (base64)."""
    message = status.message.encode()
    escaped = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message)
    return escaped + 4 * math.ceil(len(status.SerializeToString()) / 3)


def _status(error: LocknError, share: float) -> status_pb2.Status:
    def budget(size: int) -> int:
        return max(16, int(size * share))

    metadata = {
        clip(key, budget(FIELD_BYTES)): clip(value, budget(METADATA_BYTES))
        for key, value in list(error.metadata.items())[:MAX_METADATA]
    }
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    message = clip(error.message, budget(MESSAGE_BYTES))
    status = status_pb2.Status(code=error.code.value[0], message=message)
    status.details.add().Pack(info)
    if isinstance(error, InvalidArgument):
        bad = error_details_pb2.BadRequest()
        for field, why in error.violations[:MAX_VIOLATIONS]:
            bad.field_violations.add(
                field=clip(field, budget(FIELD_BYTES)),
                description=clip(why, budget(DESCRIPTION_BYTES)),
            )
        status.details.add().Pack(bad)
    if isinstance(error, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_seconds * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def internal_status(message: str = "internal error") -> grpc.Status:
    status = status_pb2.Status(code=code_pb2.INTERNAL, message=message)
    return rpc_status.to_status(status)


def from_rpc_error(error: grpc.RpcError) -> LocknError:
    """Rebuild the LocknError a LockN Gen server raised, from its status details."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after = 5.0
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToMilliseconds() / 1000
    cls = _BY_CODE.get(code, LocknError)
    if cls is InvalidArgument:
        return InvalidArgument(
            violations or [("", message or "")], reason=reason, metadata=metadata
        )
    if cls is ResourceExhausted:
        return ResourceExhausted(
            message or "", retry_after_seconds=retry_after, reason=reason, metadata=metadata
        )
    if cls is Unavailable and reason is None:
        reason = code.name
    return cls(message or code.name, reason=reason or code.name, metadata=metadata)
