"""Rows of the queue tables as protobuf messages, and back for parameters."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from datetime import datetime
from typing import Any

from asyncpg import Record
from google.protobuf.timestamp_pb2 import Timestamp

from services.contracts import gen
from services.generation.templates import Template, to_proto_value

TERMINAL_STATUSES = {
    gen.GENERATION_STATUS_COMPLETED,
    gen.GENERATION_STATUS_FAILED,
    gen.GENERATION_STATUS_CANCELLED,
}


def status_value(name: str) -> gen.GenerationStatus.ValueType:
    return gen.GenerationStatus.Value(f"GENERATION_STATUS_{name}")


def status_name(value: int) -> str:
    return gen.GenerationStatus.Name(value).removeprefix("GENERATION_STATUS_")  # type: ignore[arg-type]


# Parameters are stored in protobuf's JSON form of ParameterValue (int64 as a
# string, non-finite numbers by name), written and read here by hand:
# json_format took a tenth of GenerationService's CPU per create.
_JSON_NAMES = {
    "string_value": "stringValue",
    "int_value": "intValue",
    "number_value": "numberValue",
    "bool_value": "boolValue",
    "image_name": "imageName",
}
_FIELD_NAMES = {json_name: field for field, json_name in _JSON_NAMES.items()}
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def parameters(template: Template, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The resolved values, typed as the contract carries them, as stored."""
    stored = {}
    for name, value in values.items():
        if name in template.parameters:
            stored[name] = parameter_json(to_proto_value(template.parameters[name], value))
    return stored


def parameter_json(message: gen.ParameterValue) -> dict[str, Any]:
    """As json_format.MessageToDict writes it."""
    field = message.WhichOneof("kind")
    return {} if field is None else {_JSON_NAMES[field]: _to_json(getattr(message, field))}


def _to_json(value: Any) -> Any:
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return _NON_FINITE.get(value, value)


def set_parameter(target: gen.ParameterValue, stored: dict[str, Any]) -> None:
    """As json_format.ParseDict reads it."""
    for json_name, raw in stored.items():
        field = _FIELD_NAMES[json_name]
        if field == "int_value":
            target.int_value = int(raw)
        elif field == "number_value":
            target.number_value = float(raw)
        else:
            setattr(target, field, raw)


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def outputs(raw: Any) -> list[gen.OutputImage]:
    return [
        gen.OutputImage(
            index=o["index"],
            path=o["path"],
            content_type=o["content_type"],
            size_bytes=o["size_bytes"],
        )
        for o in _json(raw) or []
    ]


def generation(row: Record, queue_position: int = 0) -> gen.Generation:
    message = gen.Generation(
        id=str(row["id"]),
        status=status_value(row["status"]),
        template=row["template"],
        priority=row["priority"],
        request_id=row["request_id"] or "",
        duration_ms=row["duration_ms"] or 0,
        outputs=outputs(row["outputs"]),
        prompt_id=row["prompt_id"] or "",
        worker=row["worker"] or "",
        attempts=row["attempts"],
        queue_position=queue_position,
        timeout_seconds=row["timeout_seconds"],
        last_event_sequence=row["last_event_seq"],
    )
    for name, value in (_json(row["parameters"]) or {}).items():
        set_parameter(message.parameters[name], value)
    for field, column in (
        ("create_time", "created_at"),
        ("start_time", "started_at"),
        ("complete_time", "completed_at"),
    ):
        stamp = _timestamp(row[column])
        if stamp is not None:
            getattr(message, field).CopyFrom(stamp)
    if row["progress_max"] is not None:
        message.progress.CopyFrom(
            gen.Progress(
                value=row["progress_value"] or 0,
                max=row["progress_max"],
                node_id=row["progress_node"] or "",
            )
        )
    if row["error_reason"]:
        message.error.CopyFrom(
            gen.GenerationError(
                reason=row["error_reason"],
                message=row["error_message"] or "",
                details=_json(row["error_details"]) or {},
            )
        )
    return message


# Every Watch stream of a generation is handed the same event rows: each is
# converted once, with the response that carries it, not once per watcher
# (40 us each: 40 ms of one core per event with 1,000 watchers). An event
# never changes once written, and
# (generation_id, seq) names one event for good.
EVENT_CACHE_SIZE = 1024
_events: OrderedDict[tuple[Any, int], tuple[gen.GenerationEvent, gen.WatchGenerationResponse]] = (
    OrderedDict()
)


def event(row: Record) -> gen.GenerationEvent:
    """The event as a message, shared between callers: copy it, never change it."""
    return _cached(row)[0]


def watch_response(row: Record) -> gen.WatchGenerationResponse:
    """The event as WatchGeneration streams it, shared between its watchers."""
    return _cached(row)[1]


def _cached(row: Record) -> tuple[gen.GenerationEvent, gen.WatchGenerationResponse]:
    key = (row["generation_id"], row["seq"])
    messages = _events.get(key)
    if messages is None:
        message = _event(row)
        messages = _events[key] = (message, gen.WatchGenerationResponse(event=message))
        if len(_events) > EVENT_CACHE_SIZE:
            _events.popitem(last=False)
    return messages


def _event(row: Record) -> gen.GenerationEvent:
    payload = _json(row["payload"]) or {}
    message = gen.GenerationEvent(
        sequence=row["seq"],
        generation_id=str(row["generation_id"]),
        type=gen.EventType.Value(f"EVENT_TYPE_{row['type']}"),
        status=status_value(row["status"]),
        worker=payload.get("worker") or "",
        prompt_id=payload.get("prompt_id") or "",
    )
    stamp = _timestamp(row["created_at"])
    if stamp is not None:
        message.time.CopyFrom(stamp)
    if row["type"] == "PROGRESS":
        message.progress.CopyFrom(
            gen.Progress(value=payload["value"], max=payload["max"], node_id=payload["node"])
        )
    if "reason" in payload:
        message.error.CopyFrom(
            gen.GenerationError(
                reason=payload["reason"],
                message=payload.get("message", ""),
                details=payload.get("details") or {},
            )
        )
    if "outputs" in payload:
        message.outputs.extend(outputs(payload["outputs"]))
    return message
