"""The OpenAPI 3.1 document served at /openapi.json.

The JSON bodies are protobuf messages rendered by `gateway.convert.to_json`,
so their schemas are derived from the message descriptors: a field added to
the contract appears here without anyone remembering to document it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from gateway.convert import enum_name
from services.contracts import gen

JsonDict = dict[str, Any]
# proto3 JSON: 64-bit integers are strings (JavaScript numbers lose precision).
SCALARS: dict[int, JsonDict] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": "string", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "pattern": "^[0-9]+$"},
    FieldDescriptor.TYPE_DOUBLE: {"type": ["number", "string"]},
    FieldDescriptor.TYPE_FLOAT: {"type": ["number", "string"]},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
WELL_KNOWN: dict[str, JsonDict] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
}
ERROR: JsonDict = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["reason", "message"],
            "properties": {
                "reason": {"type": "string", "examples": ["INVALID_ARGUMENT", "MODEL_NOT_FOUND"]},
                "message": {"type": "string"},
                "field_violations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "field": {"type": "string"},
                            "description": {"type": "string"},
                        },
                    },
                },
            },
        }
    },
}
# A parameter's value, in requests and answers alike (convert.parameter_json).
PARAMETER_VALUE: JsonDict = {
    "description": 'A string, number or boolean; {"image": name} names an input image.',
    "oneOf": [
        {"type": ["string", "number", "boolean"]},
        {
            "type": "object",
            "required": ["image"],
            "properties": {"image": {"type": "string"}},
            "additionalProperties": False,
        },
    ],
}
CREATE_BODY: JsonDict = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "template": {"type": "string", "default": "sd15-txt2img"},
        "parameters": {
            "type": "object",
            "description": "Values by parameter name.",
            "additionalProperties": {"$ref": "#/components/schemas/ParameterValue"},
        },
        "priority": {"type": "integer", "default": 0},
        "request_id": {"type": "string", "description": "Idempotency key per caller."},
        "timeout_seconds": {"type": "integer", "minimum": 0},
        "input_images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "data_base64"],
                "properties": {
                    "name": {"type": "string"},
                    "data_base64": {"type": "string", "contentEncoding": "base64"},
                },
            },
        },
    },
}
# The messages each route answers with, by schema name.
MESSAGES: list[Descriptor] = [
    gen.Generation.DESCRIPTOR,
    gen.ListGenerationsResponse.DESCRIPTOR,
    gen.ListTemplatesResponse.DESCRIPTOR,
    gen.GetStatsResponse.DESCRIPTOR,
    gen.WatchGenerationResponse.DESCRIPTOR,
]


def document() -> JsonDict:
    # ParameterValue is placed first, so the descriptor's own shape (a oneof
    # of typed fields) never replaces the plain one the gateway answers with.
    schemas: JsonDict = {
        "Error": ERROR,
        "CreateGeneration": CREATE_BODY,
        "ParameterValue": PARAMETER_VALUE,
    }
    for message in MESSAGES:
        _add_message(message, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LockN Gen gateway",
            "version": "1.0.0",
            "description": "GenerationService over HTTP/JSON. Send `Authorization: Bearer "
            "<token>`; it is passed to GenerationService, which decides who sees what.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
    }


def _ref(name: str) -> JsonDict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JsonDict, description: str) -> JsonDict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> JsonDict:
    meanings = {
        400: "invalid input; the field is named",
        401: "no bearer token, or not a valid one (WWW-Authenticate: Bearer)",
        404: "no such generation (or not the caller's)",
        409: "not possible in the generation's state",
        413: "request body too large",
        415: "Content-Type is not application/json",
        429: "the caller's queue limit; see Retry-After",
        503: "GenerationService unavailable",
    }
    return {str(code): _json(_ref("Error"), meanings[code]) for code in (*codes, 401, 503)}


def _operation(
    operation_id: str, summary: str, responses: JsonDict, parameters: list[JsonDict] | None = None
) -> JsonDict:
    operation: JsonDict = {"operationId": operation_id, "summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    return operation


def _query(name: str, schema: JsonDict, description: str) -> JsonDict:
    return {"name": name, "in": "query", "schema": schema, "description": description}


ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _paths() -> JsonDict:
    open_probe: JsonDict = {"security": []}
    return {
        "/api/generations": {
            "post": {
                **_operation(
                    "createGeneration",
                    "Queue a generation (the same request_id again returns the first one)",
                    {
                        "202": _json(
                            _ref("Generation"),
                            "queued, or dispatched already when a worker was free;"
                            " Location names it",
                        ),
                        "200": _json(_ref("Generation"), "an earlier request with this request_id"),
                        **_errors(400, 404, 413, 415, 429),
                    },
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CreateGeneration")}},
                },
            },
            "get": _operation(
                "listGenerations",
                "The caller's generations, newest first",
                {"200": _json(_ref("ListGenerationsResponse"), "one page"), **_errors(400)},
                [
                    _query(
                        "page_size",
                        {"type": "integer", "minimum": 0, "default": 0},
                        "0 means 50; at most 500 (a larger size is lowered to 500);"
                        " a negative one is refused",
                    ),
                    _query("page_token", {"type": "string"}, "next_page_token of a page"),
                    _query(
                        "status",
                        {"type": "string"},
                        "any of these statuses: comma-separated, repeated, or both"
                        " (status=queued,running&status=dispatched)",
                    ),
                    _query("template", {"type": "string"}, "only this template"),
                ],
            ),
        },
        "/api/generations/{id}": {
            "get": _operation(
                "getGeneration",
                "One generation",
                {"200": _json(_ref("Generation"), "the generation"), **_errors(400, 404)},
                [ID],
            )
        },
        "/api/generations/{id}/cancel": {
            "post": _operation(
                "cancelGeneration",
                "Cancel: queued never runs, waiting in ComfyUI is deleted, running is interrupted",
                {"200": _json(_ref("Generation"), "cancelled"), **_errors(400, 404, 409)},
                [ID],
            )
        },
        "/api/generations/{id}/image": {
            "get": _operation(
                "getGenerationImage",
                "An output image, streamed; strong ETag, immutable",
                {
                    "200": {
                        "description": "the image",
                        "headers": {"ETag": {"schema": {"type": "string"}}},
                        "content": {
                            "image/png": {},
                            "image/jpeg": {},
                            "image/webp": {},
                        },
                    },
                    "304": {"description": "If-None-Match matched"},
                    **_errors(400, 404, 409),
                },
                [ID, _query("index", {"type": "integer", "minimum": 0}, "which output")],
            )
        },
        "/api/generations/{id}/events": {
            "get": _operation(
                "watchGeneration",
                "Server-sent events: `snapshot` first, then each `event` until a terminal one. "
                "Each event frame's id is its sequence, so ids only grow (the snapshot frame "
                "has none); reconnect with Last-Event-ID to resume after the last one seen.",
                {
                    "200": {
                        "description": "an event stream; each data line is a "
                        "WatchGenerationResponse",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 404),
                },
                [
                    ID,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                    _query("after", {"type": "integer", "minimum": 0}, "as Last-Event-ID"),
                ],
            )
        },
        "/api/templates": {
            "get": _operation(
                "listTemplates",
                "Workflow templates with their parameter schemas",
                {"200": _json(_ref("ListTemplatesResponse"), "the templates"), **_errors()},
            )
        },
        "/api/stats": {
            "get": _operation(
                "getStats",
                "Queue depth by status and the workers' slots",
                {"200": _json(_ref("GetStatsResponse"), "the stats"), **_errors()},
            )
        },
        "/healthz": {
            "get": {
                **_operation(
                    "healthz", "Liveness of the gateway", {"200": {"description": "alive"}}
                ),
                **open_probe,
            }
        },
        "/readyz": {
            "get": {
                **_operation(
                    "readyz",
                    "Ready when GenerationService is serving",
                    {"200": {"description": "ready"}, "503": {"description": "not ready"}},
                ),
                **open_probe,
            }
        },
        "/openapi.json": {
            "get": {
                **_operation("openapi", "This document", {"200": {"description": "OpenAPI"}}),
                **open_probe,
            }
        },
    }


# ----- schemas from descriptors ------------------------------------------------------


def _add_message(descriptor: Descriptor, schemas: JsonDict) -> None:
    name = descriptor.name
    if name in schemas or descriptor.full_name in WELL_KNOWN:
        return
    schemas[name] = {}  # placed first: recursive messages end here
    properties = {field.name: _field(field, schemas) for field in descriptor.fields}
    schemas[name] = {"type": "object", "properties": properties, "additionalProperties": False}


def _field(field: FieldDescriptor, schemas: JsonDict) -> JsonDict:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value, schemas)}
    single = _single(field, schemas)
    if field.is_repeated:
        return {"type": "array", "items": single}
    return single


def _single(field: FieldDescriptor, schemas: JsonDict) -> JsonDict:
    if field.message_type is not None:
        known = WELL_KNOWN.get(field.message_type.full_name)
        if known is not None:
            return dict(known)
        _add_message(field.message_type, schemas)
        return _ref(field.message_type.name)
    if field.enum_type is not None:
        return {"type": "string", "enum": _enum_names(field.enum_type)}
    return dict(SCALARS[field.type])


def _enum_names(enum: EnumDescriptor) -> list[str]:
    return [enum_name(value.name) for value in enum.values]
