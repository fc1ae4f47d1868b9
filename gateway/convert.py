"""JSON shapes of the HTTP API: requests in, protobuf messages out, with
lower-case status and event names as HTTP clients expect, and parameter
values in one plain shape both ways (`{"steps": 8}`, `{"image": name}`)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.contracts import gen
from services.errors import InvalidArgument, clip

STATUS_PREFIX = "GENERATION_STATUS_"
# Enum names HTTP clients see lower-cased and without their prefix.
ENUM_PREFIXES = (STATUS_PREFIX, "EVENT_TYPE_", "PARAMETER_TYPE_")
# Statuses by the names HTTP clients use; the zero value ("unspecified") is
# no generation's status, so it is not among them.
STATUS_VALUES = {
    name.removeprefix(STATUS_PREFIX).lower(): value
    for name, value in gen.GenerationStatus.items()
    if value != gen.GENERATION_STATUS_UNSPECIFIED
}
# JSON types as a refusal names them.
KIND_NAMES = {int: "an integer", str: "a string", bool: "a boolean"}
# The most of the caller's own text (a key, a name) a refusal quotes, in
# UTF-8 bytes: a 200 KB key must not make a 400 KB answer.
ECHO_BYTES = 40


def to_json(message: Message) -> dict[str, Any]:
    """`message` as the HTTP API answers it: every field written, zero values
    and empty lists included (a client reads `index: 0`, not a missing key),
    enum values by their HTTP names, and parameter values in the plain shape
    requests give them."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _http_shape(message, data)
    return data


def enum_name(name: str) -> str:
    """An enum value's name as HTTP clients see it: lower case, without its prefix."""
    prefix = next((p for p in ENUM_PREFIXES if name.startswith(p)), "")
    return name.removeprefix(prefix).lower()


def _http_shape(message: Message, data: dict[str, Any]) -> None:
    """Rewrites `data`, json_format's rendering of `message`, in place: only
    enum fields are renamed (never a prompt that happens to look like one),
    and each ParameterValue is written as `parameter_json` writes it."""
    # upb's descriptor, typed apart from (but shaped like) the Python one.
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value, rendered = getattr(message, field.name), data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            data[field.name] = {k: _shaped(entry, value[k], v) for k, v in rendered.items()}
        elif field.is_repeated:
            data[field.name] = [_shaped(field, m, v) for m, v in zip(value, rendered, strict=True)]
        else:
            data[field.name] = _shaped(field, value, rendered)


def _shaped(field: FieldDescriptor, value: Any, rendered: Any) -> Any:
    # json_format writes an enum value it has no name for as its number.
    if field.enum_type is not None and isinstance(rendered, str):
        return enum_name(rendered)
    if field.message_type is gen.ParameterValue.DESCRIPTOR:
        return parameter_json(value)
    # Well-known types (Timestamp) are rendered as strings, with nothing inside.
    if field.message_type is not None and isinstance(rendered, dict):
        _http_shape(value, rendered)
    return rendered


def parameter_json(value: gen.ParameterValue) -> Any:
    """A parameter's value as a request gives it (see `parameter`)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "image_name":
        return {"image": value.image_name}
    return getattr(value, kind)


def parameter(name: str, value: Any) -> gen.ParameterValue:
    """JSON value → typed parameter; {"image": name} names an input image."""
    if isinstance(value, bool):
        return gen.ParameterValue(bool_value=value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidArgument.field(
                f"parameters.{clip(name, ECHO_BYTES)}", "integer out of the 64-bit range"
            )
        return gen.ParameterValue(int_value=value)
    if isinstance(value, float):
        return gen.ParameterValue(number_value=value)
    if isinstance(value, str):
        return gen.ParameterValue(string_value=value)
    if isinstance(value, dict) and set(value) == {"image"} and isinstance(value["image"], str):
        return gen.ParameterValue(image_name=value["image"])
    raise InvalidArgument.field(
        f"parameters.{clip(name, ECHO_BYTES)}",
        'a string, number, boolean or {"image": "<input image name>"}',
    )


def create_request(body: Any) -> gen.CreateGenerationRequest:
    if not isinstance(body, dict):
        raise InvalidArgument.field("body", "a JSON object")
    known = {"template", "parameters", "priority", "request_id", "timeout_seconds", "input_images"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidArgument.field(
            clip(unknown[0], ECHO_BYTES), f"unknown field (known: {', '.join(sorted(known))})"
        )
    request = gen.CreateGenerationRequest(
        template=_typed(body, "template", str, "sd15-txt2img"),
        priority=_typed(body, "priority", int, 0, bounds=(-(2**31), 2**31 - 1)),
        request_id=_typed(body, "request_id", str, ""),
        timeout_seconds=_typed(body, "timeout_seconds", int, 0, bounds=(0, 2**32 - 1)),
    )
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument.field("parameters", "a JSON object")
    for name, value in parameters.items():
        request.parameters[name].CopyFrom(parameter(name, value))
    images = body.get("input_images", [])
    if not isinstance(images, list):
        raise InvalidArgument.field("input_images", "a list")
    for n, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("name"), str):
            raise InvalidArgument.field(f"input_images[{n}]", '{"name": ..., "data_base64": ...}')
        try:
            data = base64.b64decode(str(image.get("data_base64", "")), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument.field(f"input_images[{n}].data_base64", "not base64") from None
        request.input_images.append(gen.InputImage(name=image["name"], data=data))
    return request


def _typed(
    body: dict[str, Any],
    key: str,
    kind: type,
    default: Any,
    bounds: tuple[int, int] | None = None,
) -> Any:
    value = body.get(key, default)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument.field(key, f"must be {KIND_NAMES[kind]}")
    if bounds is not None and isinstance(value, int) and not bounds[0] <= value <= bounds[1]:
        raise InvalidArgument.field(key, f"between {bounds[0]} and {bounds[1]}")
    return value


def statuses(values: Iterable[str]) -> list[gen.GenerationStatus.ValueType]:
    """The statuses `status` query parameters name: each may be given more
    than once, and each value may list several, comma-separated."""
    found = []
    for name in filter(None, (part.strip() for value in values for part in value.split(","))):
        status = STATUS_VALUES.get(name.lower())
        if status is None:
            known = ", ".join(STATUS_VALUES)
            quoted = clip(name, ECHO_BYTES)
            raise InvalidArgument.field("status", f"unknown status {quoted!r} (known: {known})")
        found.append(status)
    return found
