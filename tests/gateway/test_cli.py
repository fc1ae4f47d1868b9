"""The `lockn-gen` client subcommands, run as a user would, against a real
GenerationService."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from PIL import Image

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


# ----- templates that take images, typed parameters ----------------------------------


async def test_upscale_takes_its_image_from_a_file_and_no_prompt(
    generation_service: GenerationClient, tmp_path: Path
) -> None:
    source = tmp_path / "small.png"
    Image.new("RGB", (24, 16), "red").save(source)
    code, out, err = await lockn(
        generation_service, "generate", "--template", "upscale", "--image", f"image={source}"
    )
    assert code == 0, err
    with Image.open(out.strip().splitlines()[-1]) as upscaled:
        assert upscaled.size == (48, 32)  # the simulator's model doubles the input


async def test_image_files_that_cannot_be_read_are_refused(
    generation_service: GenerationClient, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.png"
    code, out, err = await lockn(
        generation_service, "generate", "--template", "upscale", "--image", f"image={missing}"
    )
    assert (code, out) == (2, "")
    assert err == f"error: INVALID_ARGUMENT: --image: {missing}: No such file or directory\n"


async def test_param_values_take_the_type_the_template_declares(
    generation_service: GenerationClient,
) -> None:
    code, out, err = await lockn(
        generation_service,
        "generate",
        "a fox",
        "--param",
        "negative_prompt=1990",
        "--param",
        "steps=2",
        "--json",
    )
    assert code == 0, err
    parameters = json.loads(out)["parameters"]
    assert parameters["negative_prompt"] == {"string_value": "1990"}
    assert parameters["steps"] == {"int_value": "2"}


async def test_param_mistakes_are_one_line_errors_and_create_nothing(
    generation_service: GenerationClient,
) -> None:
    refused = {
        ("a fox", "--param", "steps"): "INVALID_ARGUMENT: --param: 'steps': expected NAME=VALUE",
        ("a fox", "--param", "prompt=a dog"): (
            "INVALID_ARGUMENT: parameters.prompt: given twice, as the PROMPT argument"
            " and as --param prompt=a dog; give one"
        ),
        ("a fox", "--template", "nope", "--param", "steps=2"): "TEMPLATE_NOT_FOUND: ",
    }
    for args, error in refused.items():
        code, out, err = await lockn(generation_service, "generate", *args)
        assert (code, out) == (2, ""), err
        assert err.startswith(f"error: {error}") and len(err.splitlines()) == 1, err
    code, out, _ = await lockn(generation_service, "list")
    assert (code, out) == (0, "no generations\n")
