"""The `lockn-gen` client subcommands, run as a user would, against a real
GenerationService."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.fixtures.generation import GenerationClient


async def lockn(service: GenerationClient, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "LOCKN_GENERATION_ADDRESS": f"127.0.0.1:{service.running.port}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_generate_prints_the_image_path_and_json_for_scripts(
    generation_service: GenerationClient,
) -> None:
    code, out, err = await lockn(generation_service, "generate", "a fox", "--param", "steps=3")
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1])
    assert path.read_bytes().startswith(b"\x89PNG")
    assert "3/3" in err  # the live progress bar

    code, out, _ = await lockn(generation_service, "list", "--json")
    listed = json.loads(out)["generations"]
    assert code == 0 and listed[0]["status"] == "completed"
    code, out, _ = await lockn(generation_service, "get", listed[0]["id"], "--json")
    assert json.loads(out)["outputs"][0]["path"] == str(path)
    code, out, _ = await lockn(generation_service, "templates")
    assert "sd15-txt2img" in out and "prompt (string, required)" in out
    code, out, _ = await lockn(generation_service, "stats", "--json")
    assert json.loads(out)["workers"][0]["serving"] is True


async def test_errors_are_one_line_with_the_reason_once(
    generation_service: GenerationClient,
) -> None:
    code, out, err = await lockn(generation_service, "generate", "x", "--param", "steps=0")
    [line] = err.splitlines()
    assert (code, out) == (2, "")
    assert line.startswith("error: INVALID_ARGUMENT: parameters.steps: "), line
    code, _, err = await lockn(generation_service, "cancel", "not-an-id")
    [line] = err.splitlines()
    assert code == 2 and line.startswith("error: INVALID_ARGUMENT: id: "), line


async def test_probe_of_an_unknown_service_names_it(generation_service: GenerationClient) -> None:
    address = f"127.0.0.1:{generation_service.running.port}"
    code, out, err = await lockn(
        generation_service, "probe", "--address", address, "--service", "nope"
    )
    assert (code, out) == (2, "")
    assert err == f"error: NOT_FOUND: {address} reports no health for service 'nope'\n"
