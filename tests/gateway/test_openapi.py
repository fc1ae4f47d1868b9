"""/openapi.json: a valid OpenAPI 3.1 document that lists exactly the routes
the gateway serves and whose schemas the real answers satisfy."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway import openapi
from gateway.server import create_app
from services.generation.servicer import DEFAULT_PAGE, MAX_PAGE
from services.settings import load_settings
from tests.fixtures.generation import GenerationClient

DOCUMENT_URI = "urn:lockn:openapi"


async def fetch_document(gateway: aiohttp.ClientSession) -> dict[str, Any]:
    async with gateway.get("/openapi.json") as reply:
        assert reply.status == 200
        document: dict[str, Any] = await reply.json()
    return document


def check(document: dict[str, Any], schema_name: str, body: Any) -> None:
    """Validate `body` against components/schemas/`schema_name`, $refs resolved."""
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{DOCUMENT_URI}#/components/schemas/{schema_name}"}, registry=registry
    )
    validator.validate(body)


async def test_the_document_is_valid_openapi_and_lists_exactly_the_served_routes(
    gateway: aiohttp.ClientSession,
) -> None:
    document = await fetch_document(gateway)
    validate(document)
    app = create_app(load_settings())
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    assert documented == served


async def test_real_answers_match_their_schemas(
    gateway: aiohttp.ClientSession, generation_service: GenerationClient
) -> None:
    document = await fetch_document(gateway)
    body = {"parameters": {"prompt": 'a "cat"', "steps": 2}, "request_id": "schema-1"}
    check(document, "CreateGeneration", body)
    async with gateway.post("/api/generations", json=body) as reply:
        created = await reply.json()
    check(document, "Generation", created)

    frames = []
    async with gateway.get(f"/api/generations/{created['id']}/events") as reply:
        async for raw in reply.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                frames.append(json.loads(line[5:]))
    assert frames[-1]["event"]["type"] == "completed"
    for frame in frames:
        check(document, "WatchGenerationResponse", frame)

    answers = {
        f"/api/generations/{created['id']}": "Generation",
        "/api/generations?page_size=5": "ListGenerationsResponse",
        "/api/templates": "ListTemplatesResponse",
        "/api/stats": "GetStatsResponse",
    }
    for path, schema_name in answers.items():
        async with gateway.get(path) as reply:
            assert reply.status == 200, path
            check(document, schema_name, await reply.json())

    queued = await generation_service.create(prompt="to cancel", steps=50)
    async with gateway.post(f"/api/generations/{queued.id}/cancel") as reply:
        assert reply.status == 200
        check(document, "Generation", await reply.json())


async def test_every_error_has_the_documented_error_shape(gateway: aiohttp.ClientSession) -> None:
    document = await fetch_document(gateway)
    refusals = [
        ("GET", "/api/generations/not-a-uuid", None, 400),
        ("GET", "/api/generations/00000000-0000-4000-8000-000000000000", None, 404),
        ("POST", "/api/generations", {"template": "no-such-template"}, 404),
        ("POST", "/api/generations", {"priority": "high"}, 400),
        ("GET", "/api/no-such-route", None, 404),
        ("DELETE", "/api/templates", None, 405),
    ]
    for method, path, body, status in refusals:
        async with gateway.request(method, path, json=body) as reply:
            assert reply.status == status, (method, path, await reply.text())
            check(document, "Error", await reply.json())
    plain = {"Content-Type": "text/plain"}
    async with gateway.post("/api/generations", data="{}", headers=plain) as reply:
        assert reply.status == 415
        check(document, "Error", await reply.json())
    assert "415" in document["paths"]["/api/generations"]["post"]["responses"]


def test_page_size_is_documented_as_generation_service_applies_it() -> None:
    listing = openapi.document()["paths"]["/api/generations"]["get"]
    page_size = next(p for p in listing["parameters"] if p["name"] == "page_size")
    assert f"0 means {DEFAULT_PAGE}" in page_size["description"]
    assert f"at most {MAX_PAGE}" in page_size["description"]
    assert page_size["schema"]["minimum"] == 0  # negative sizes are refused
