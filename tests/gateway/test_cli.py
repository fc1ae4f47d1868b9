"""The `lockn-gen` client subcommands, run as a user would, against a real
GenerationService: output, the one-line errors (`error: REASON: message`,
exit status 2), watching, templates that take images, and typed parameters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from PIL import Image

from services.cli import build_parser
from services.client_cli import WatchLine
from services.contracts import gen
from tests.fixtures.generation import GenerationClient

# Slow enough that a generation is still running whatever the test does
# meanwhile; each test cancels what it leaves behind.
SLOW_STEP_SECONDS = 0.5


async def spawn(service: GenerationClient, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "LOCKN_GENERATION_ADDRESS": f"127.0.0.1:{service.running.port}"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def lockn(service: GenerationClient, *args: str) -> tuple[int, str, str]:
    return await finish(await spawn(service, *args))


async def watched_id(process: asyncio.subprocess.Process) -> str:
    """The id `generate --watch` announces on stderr before it follows."""
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stderr.readline(), 60)
    assert line.startswith(b"generation "), line
    return line.decode().removeprefix("generation ").strip()


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


# ----- errors ------------------------------------------------------------------------


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


# ----- watching ----------------------------------------------------------------------


async def test_a_watched_generation_that_times_out_ends_with_its_reason_on_stderr(
    generation_service: GenerationClient,
) -> None:
    generation_service.simulator.sim.set_step_seconds(SLOW_STEP_SECONDS)
    code, out, err = await lockn(
        generation_service, "generate", "slow", "--param", "steps=100", "--timeout", "1"
    )
    first, *_, last = err.strip().splitlines()
    generation_id = first.removeprefix("generation ")
    assert (code, out) == (2, "")
    assert last == "error: TIMEOUT: no completion within 1 s; prompt cancelled", err

    failed = await generation_service.wait(generation_id)
    assert (failed.status, failed.timeout_seconds) == (gen.GENERATION_STATUS_FAILED, 1)
    code, out, _ = await lockn(generation_service, "get", generation_id)
    assert code == 0
    assert "status    failed" in out.splitlines()
    assert "error     TIMEOUT: no completion within 1 s; prompt cancelled" in out.splitlines()


async def test_a_watched_generation_cancelled_elsewhere_ends_with_an_error(
    generation_service: GenerationClient,
) -> None:
    generation_service.simulator.sim.set_step_seconds(SLOW_STEP_SECONDS)
    process = await spawn(generation_service, "generate", "slow", "--param", "steps=100")
    generation_id = await watched_id(process)
    await generation_service.stub.CancelGeneration(gen.CancelGenerationRequest(id=generation_id))
    code, out, err = await finish(process)
    assert (code, out) == (2, "")
    assert err.strip().splitlines()[-1].startswith("error: CANCELLED: "), err


async def test_ctrl_c_stops_the_watch_but_not_the_generation(
    generation_service: GenerationClient,
) -> None:
    generation_service.simulator.sim.set_step_seconds(SLOW_STEP_SECONDS)
    process = await spawn(generation_service, "generate", "slow", "--param", "steps=100")
    generation_id = await watched_id(process)
    process.send_signal(signal.SIGINT)
    code, out, err = await finish(process)
    assert (code, out) == (130, "")
    assert f"generation {generation_id} keeps running" in err
    assert f"lockn-gen cancel {generation_id}" in err

    reply = await generation_service.stub.GetGeneration(gen.GetGenerationRequest(id=generation_id))
    assert reply.generation.status not in (
        gen.GENERATION_STATUS_CANCELLED,
        gen.GENERATION_STATUS_FAILED,
    )
    await generation_service.stub.CancelGeneration(gen.CancelGenerationRequest(id=generation_id))


async def test_the_watch_line_keeps_the_queue_position_and_shows_no_unknown_total(
    generation_service: GenerationClient,
) -> None:
    generation_service.simulator.sim.set_step_seconds(SLOW_STEP_SECONDS)
    created = [await generation_service.create("busy", steps=100)]
    while created[-1].status != gen.GENERATION_STATUS_QUEUED:
        assert len(created) < 10, "no generation had to wait for a slot"
        created.append(await generation_service.create("busy", steps=100))
    waiting = created[-1]
    line = WatchLine.of(waiting)
    call = generation_service.stub.WatchGeneration(gen.WatchGenerationRequest(id=waiting.id))
    async for item in call:
        line.apply(item)
        if item.HasField("event"):
            break
    call.cancel()
    # The CREATED event says only "queued"; the position the snapshot gave stays.
    assert item.event.type == gen.EVENT_TYPE_CREATED
    assert line.description == f"queued (position {waiting.queue_position})"
    assert line.steps == ""
    for generation in created:
        await generation_service.stub.CancelGeneration(
            gen.CancelGenerationRequest(id=generation.id)
        )


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
    # Upscaling reports no sampler steps: the bar shows no count rather than a guess.
    assert "None" not in err and "/" not in err.splitlines()[-1]


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
    code, _, err = await lockn(
        generation_service,
        "generate",
        "a fox",
        "--param",
        "negative_prompt=1990",
        "--param",
        "steps=2",
    )
    assert code == 0, err
    done = await generation_service.wait(err.splitlines()[0].removeprefix("generation "))
    assert done.parameters["negative_prompt"] == gen.ParameterValue(string_value="1990")
    assert done.parameters["steps"] == gen.ParameterValue(int_value=2)


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


# ----- the other commands ------------------------------------------------------------


def test_every_option_of_generate_and_list_says_what_it_does() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name in ("generate", "list"):
        sub = commands.choices[name]  # type: ignore[index]
        silent = [a.dest for a in sub._actions if not a.help]
        assert not silent, f"{name}: {silent}"


async def test_templates_show_defaults_ranges_and_choices(
    generation_service: GenerationClient,
) -> None:
    code, out, _ = await lockn(generation_service, "templates")
    lines = out.splitlines()
    assert code == 0
    assert "    steps (integer, default 20, 1..150): Denoising steps." in lines
    assert '    negative_prompt (string, default ""): What the image should not show.' in lines
    sampler = next(line for line in lines if line.startswith("    sampler ("))
    assert sampler.startswith('    sampler (enum, default "euler", one of: euler, euler_cfg_pp, ')


async def test_list_filters_by_template(generation_service: GenerationClient) -> None:
    sd15 = await generation_service.create("a fox")
    sdxl = await generation_service.create("a fox", template="sdxl-txt2img")
    for created in (sd15, sdxl):
        await generation_service.wait(created.id)
    code, out, _ = await lockn(generation_service, "list", "--template", "sdxl-txt2img")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == [sdxl.id]


async def test_get_summarises_for_people_and_prints_json_on_request(
    generation_service: GenerationClient,
) -> None:
    done = await generation_service.wait((await generation_service.create("a fox")).id)
    code, out, _ = await lockn(generation_service, "get", done.id)
    assert code == 0
    assert out.splitlines()[:3] == [
        f"id        {done.id}",
        "status    completed",
        "template  sd15-txt2img",
    ]
    assert f"output    {done.outputs[0].path}" in out.splitlines()
    code, out, _ = await lockn(generation_service, "list")
    assert out.split()[:2] == [done.id, "completed"]  # the same words as get's
    code, out, _ = await lockn(generation_service, "get", done.id, "--json")
    assert json.loads(out)["id"] == done.id
