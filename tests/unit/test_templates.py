"""Workflow templates: loading, validation, and injection-proof resolution."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.contracts import gen
from services.errors import InvalidArgument, LocknError, NotFound
from services.generation.templates import (
    ImageRef,
    Resolved,
    Template,
    TemplateLibrary,
    to_proto,
    values_from_proto,
)

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SHIPPED = ["img2img", "inpaint", "sd15-txt2img", "sdxl-txt2img", "upscale"]
CHECKPOINTS = ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"]
SEED_MAX = 18446744073709551615
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A template whose prompt allows 2 MB, for the 1 MB verbatim case.
BIG_GRAPH: dict[str, Any] = {
    "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
    "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
}
BIG_YAML = """\
description: big
parameters:
  prompt: {type: string, required: true, max_length: 2000000, targets: ["1.text"]}
"""


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    return TemplateLibrary.load(WORKFLOWS)


def minimal_values(template: Template) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for param in template.parameters.values():
        if param.required:
            values[param.name] = ImageRef("example.png") if param.type == "image" else "a cat"
    return values


def expected_graph(resolved: Resolved) -> dict[str, Any]:
    """The template graph with exactly the declared targets overwritten."""
    graph = copy.deepcopy(resolved.template.graph)
    for name, value in resolved.parameters.items():
        param = resolved.template.parameters[name]
        for node_id, input_name in param.targets:
            graph[node_id]["inputs"][input_name] = float(value) if param.type == "number" else value
    return graph


def violation_fields(exc: InvalidArgument) -> list[str]:
    return [field for field, _ in exc.violations]


def write_template(directory: Path, name: str, graph: Any, declaration: str) -> None:
    text = graph if isinstance(graph, str) else json.dumps(graph)
    (directory / f"{name}.json").write_text(text)
    (directory / f"{name}.yaml").write_text(declaration)


# ----- shipped templates --------------------------------------------------------


def test_every_shipped_template_loads(library: TemplateLibrary) -> None:
    assert library.errors == {}
    assert [t.name for t in library.templates()] == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_template_resolves_with_minimal_values(library: TemplateLibrary, name: str) -> None:
    template = library.get(name)
    resolved = library.resolve(
        name, minimal_values(template), available_checkpoints=CHECKPOINTS, rng=random.Random(1)
    )
    assert resolved.graph == expected_graph(resolved)
    assert resolved.graph is not template.graph
    assert set(resolved.image_inputs) == {
        p.name for p in template.parameters.values() if p.type == "image"
    }
    assert all(v == "example.png" for v in resolved.image_inputs.values())
    # Defaults come back in the report, so a run can be reproduced from it.
    for param in template.parameters.values():
        if param.default is not None:
            assert resolved.parameters[param.name] == param.default
    to_proto(template)  # every default fits its protobuf field


@pytest.mark.parametrize(
    ("name", "checkpoint"),
    [
        ("sd15-txt2img", "v1-5-pruned-emaonly.safetensors"),
        ("sdxl-txt2img", "sd_xl_base_1.0.safetensors"),
        ("img2img", "v1-5-pruned-emaonly.safetensors"),
        ("inpaint", "v1-5-pruned-emaonly.safetensors"),
        ("upscale", None),
    ],
)
def test_checkpoint_is_reported(library: TemplateLibrary, name: str, checkpoint: str) -> None:
    resolved = library.resolve(name, minimal_values(library.get(name)))
    assert resolved.checkpoint == checkpoint


def test_txt2img_shape(library: TemplateLibrary) -> None:
    graph = library.get("sd15-txt2img").graph
    classes = {node_id: node["class_type"] for node_id, node in graph.items()}
    assert classes == {
        "3": "KSampler",
        "4": "CheckpointLoaderSimple",
        "5": "EmptyLatentImage",
        "6": "CLIPTextEncode",
        "7": "CLIPTextEncode",
        "8": "VAEDecode",
        "9": "SaveImage",
    }
    assert graph["9"]["inputs"]["filename_prefix"] == "lockn"
    sdxl = library.get("sdxl-txt2img")
    assert sdxl.parameters["width"].default == sdxl.parameters["height"].default == 1024


def test_random_seed_is_drawn_and_reported(library: TemplateLibrary) -> None:
    first = library.resolve("sd15-txt2img", {"prompt": "x"}, rng=random.Random(7))
    again = library.resolve("sd15-txt2img", {"prompt": "x"}, rng=random.Random(7))
    seed = first.parameters["seed"]
    assert seed == again.parameters["seed"]
    assert 0 <= seed <= SEED_MAX
    assert first.graph["3"]["inputs"]["seed"] == seed
    explicit = library.resolve("sd15-txt2img", {"prompt": "x", "seed": SEED_MAX})
    assert explicit.graph["3"]["inputs"]["seed"] == SEED_MAX


def test_number_accepts_int_and_writes_float(library: TemplateLibrary) -> None:
    resolved = library.resolve("sd15-txt2img", {"prompt": "x", "cfg": 5})
    assert resolved.graph["3"]["inputs"]["cfg"] == 5.0
    assert isinstance(resolved.graph["3"]["inputs"]["cfg"], float)


# ----- errors name the field ----------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"prompt": "x", "bogus": 1}, "parameters.bogus", "unknown parameter (known: prompt"),
        ({}, "parameters.prompt", "required"),
        ({"prompt": 5}, "parameters.prompt", "expected a string"),
        ({"prompt": "a\x00b"}, "parameters.prompt", "NUL"),
        ({"prompt": "x" * 10_001}, "parameters.prompt", "longer than 10000"),
        ({"prompt": "x", "steps": 0}, "parameters.steps", "at least 1"),
        ({"prompt": "x", "steps": 151}, "parameters.steps", "at most 150"),
        ({"prompt": "x", "steps": True}, "parameters.steps", "expected an integer"),
        ({"prompt": "x", "steps": 20.0}, "parameters.steps", "expected an integer"),
        ({"prompt": "x", "steps": "20"}, "parameters.steps", "expected an integer"),
        ({"prompt": "x", "cfg": "7"}, "parameters.cfg", "expected a number"),
        ({"prompt": "x", "cfg": False}, "parameters.cfg", "expected a number"),
        ({"prompt": "x", "cfg": float("nan")}, "parameters.cfg", "finite"),
        ({"prompt": "x", "cfg": 30.5}, "parameters.cfg", "at most 30"),
        ({"prompt": "x", "seed": -1}, "parameters.seed", "at least 0"),
        ({"prompt": "x", "seed": SEED_MAX + 1}, "parameters.seed", "at most"),
        ({"prompt": "x", "sampler": "nope"}, "parameters.sampler", "not one of"),
        ({"prompt": "x", "sampler": 1}, "parameters.sampler", "expected a string"),
        ({"prompt": ImageRef("a.png")}, "parameters.prompt", "image reference"),
        ({"prompt": "x", "checkpoint": None}, "parameters.checkpoint", "null"),
    ],
)
def test_bad_value_names_the_field(
    library: TemplateLibrary, values: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        library.resolve("sd15-txt2img", values)
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert violation_fields(caught.value) == [field]
    assert words in caught.value.violations[0][1]


def test_every_bad_parameter_is_listed(library: TemplateLibrary) -> None:
    with pytest.raises(InvalidArgument) as caught:
        library.resolve("sd15-txt2img", {"steps": 0, "cfg": "x", "what": 1})
    assert sorted(violation_fields(caught.value)) == [
        "parameters.cfg",
        "parameters.prompt",
        "parameters.steps",
        "parameters.what",
    ]


@pytest.mark.parametrize("value", ["example.png", ImageRef("../etc/passwd"), ImageRef(""), None])
def test_image_parameter_needs_a_valid_reference(library: TemplateLibrary, value: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        library.resolve("img2img", {"prompt": "x", "image": value})
    assert violation_fields(caught.value) == ["parameters.image"]


def test_unknown_checkpoint_is_model_not_found(library: TemplateLibrary) -> None:
    with pytest.raises(InvalidArgument) as caught:
        library.resolve(
            "sd15-txt2img",
            {"prompt": "x", "checkpoint": "missing.safetensors"},
            available_checkpoints=CHECKPOINTS,
        )
    assert isinstance(caught.value, LocknError)
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert violation_fields(caught.value) == ["parameters.checkpoint"]
    for name in CHECKPOINTS:
        assert name in caught.value.message
    # Without a list there is nothing to check against; the worker's ComfyUI decides.
    library.resolve("sd15-txt2img", {"prompt": "x", "checkpoint": "missing.safetensors"})


def test_default_checkpoint_is_checked_too(library: TemplateLibrary) -> None:
    with pytest.raises(InvalidArgument) as caught:
        library.resolve("sdxl-txt2img", {"prompt": "x"}, available_checkpoints=CHECKPOINTS[:1])
    assert caught.value.reason == "MODEL_NOT_FOUND"


def test_every_model_kind_is_checked_not_only_checkpoints(library: TemplateLibrary) -> None:
    # Found by tests/fuzz: an upscaler name climbing out of its folder was queued.
    upscalers = {"upscale_models": ["RealESRGAN_x4plus.pth"]}
    values = {"image": ImageRef("in.png"), "upscale_model": "../../x.pth"}
    with pytest.raises(InvalidArgument) as caught:
        library.resolve("upscale", values, available_models=upscalers)
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert violation_fields(caught.value) == ["parameters.upscale_model"]
    assert "RealESRGAN_x4plus.pth" in caught.value.message
    library.resolve(
        "upscale", {**values, "upscale_model": "RealESRGAN_x4plus.pth"}, available_models=upscalers
    )


# ----- names never become paths -------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "..",
        ".",
        "/etc/passwd",
        "..\\x",
        "",
        "A",
        "x" * 65,
        "sd15-txt2img/",
        "sd15-txt2img\x00",
        " sd15-txt2img",
        "%2e%2e",
    ],
)
def test_bad_names_are_invalid_argument(library: TemplateLibrary, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        library.get(name)
    assert violation_fields(caught.value) == ["template"]


def test_unknown_name_is_not_found(library: TemplateLibrary) -> None:
    with pytest.raises(NotFound) as caught:
        library.get("no-such-template")
    assert caught.value.reason == "TEMPLATE_NOT_FOUND"


def test_files_outside_the_directory_are_never_read(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    write_template(tmp_path, "outside", BIG_GRAPH, BIG_YAML)
    library = TemplateLibrary.load(inside)
    with pytest.raises(InvalidArgument):
        library.get("../outside")
    with pytest.raises(NotFound):
        library.get("outside")


# ----- loading and reloading ----------------------------------------------------


@pytest.mark.parametrize(
    ("graph", "declaration", "bad_file", "words"),
    [
        ("{not json", BIG_YAML, "t.json", "invalid JSON"),
        ([1, 2], BIG_YAML, "t.json", "graph must"),
        ({"1": {"inputs": {}}}, BIG_YAML, "t.json", "class_type"),
        (BIG_GRAPH, "parameters: [unclosed", "t.yaml", "invalid YAML"),
        (BIG_GRAPH, "parameters:\n  p: {type: string, targets: ['9.text']}\n", "t.yaml", "no node"),
        (BIG_GRAPH, "parameters:\n  p: {type: string, targets: ['1.txt']}\n", "t.yaml", "no input"),
        (BIG_GRAPH, "parameters:\n  p: {type: string, targets: ['1.clip']}\n", "t.yaml", "link"),
        (BIG_GRAPH, "parameters:\n  p: {type: string, targets: []}\n", "t.yaml", "targets"),
        (BIG_GRAPH, "parameters:\n  p: {type: str, targets: ['1.text']}\n", "t.yaml", "type"),
        (
            BIG_GRAPH,
            "parameters:\n  p: {type: integer, default: 0, minimum: 1, targets: ['1.text']}\n",
            "t.yaml",
            "default",
        ),
        (
            BIG_GRAPH,
            "parameters:\n  p: {type: enum, default: c, choices: [a, b], targets: ['1.text']}\n",
            "t.yaml",
            "default",
        ),
        (BIG_GRAPH, "parameters:\n  p: {type: enum, targets: ['1.text']}\n", "t.yaml", "choices"),
        (
            BIG_GRAPH,
            "parameters:\n  p: {type: string, requird: true, targets: ['1.text']}\n",
            "t.yaml",
            "unknown keys",
        ),
        (
            BIG_GRAPH,
            "parameters:\n  p: {type: string, targets: ['1.text']}\n"
            "  q: {type: string, targets: ['1.text']}\n",
            "t.yaml",
            "already set",
        ),
        (
            BIG_GRAPH,
            "parameters:\n  p: {type: string, random: true, targets: ['1.text']}\n",
            "t.yaml",
            "random",
        ),
    ],
)
def test_broken_template_is_reported_without_stopping_others(
    tmp_path: Path, graph: Any, declaration: str, bad_file: str, words: str
) -> None:
    write_template(tmp_path, "good", BIG_GRAPH, BIG_YAML)
    write_template(tmp_path, "t", graph, declaration)
    library = TemplateLibrary.load(tmp_path)
    assert [t.name for t in library.templates()] == ["good"]
    assert list(library.errors) == [bad_file]
    assert words in library.errors[bad_file]


def test_half_a_pair_is_reported(tmp_path: Path) -> None:
    (tmp_path / "lonely.json").write_text(json.dumps(BIG_GRAPH))
    (tmp_path / "orphan.yaml").write_text(BIG_YAML)
    (tmp_path / "Bad Name.json").write_text(json.dumps(BIG_GRAPH))
    (tmp_path / "Bad Name.yaml").write_text(BIG_YAML)
    library = TemplateLibrary.load(tmp_path)
    assert library.templates() == []
    assert set(library.errors) == {"lonely.json", "orphan.yaml", "Bad Name.json", "Bad Name.yaml"}


def test_reload_picks_up_new_changed_and_removed_files(tmp_path: Path) -> None:
    library = TemplateLibrary.load(tmp_path)
    assert library.templates() == []
    assert library.reload_if_changed() is False
    write_template(tmp_path, "new", BIG_GRAPH, BIG_YAML)
    assert library.reload_if_changed() is True
    assert library.get("new").description == "big"
    assert library.reload_if_changed() is False
    (tmp_path / "new.yaml").write_text(BIG_YAML.replace("big", "bigger"))
    stat = (tmp_path / "new.yaml").stat()
    # Same-size rewrites within one mtime tick must still be seen.
    os.utime(tmp_path / "new.yaml", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert library.reload_if_changed() is True
    assert library.get("new").description == "bigger"
    (tmp_path / "new.json").unlink()
    library.reload()
    assert library.templates() == []
    assert "new.yaml" in library.errors


def test_copied_shipped_templates_load(tmp_path: Path) -> None:
    shutil.copytree(WORKFLOWS, tmp_path / "w")
    assert [t.name for t in TemplateLibrary.load(tmp_path / "w").templates()] == SHIPPED


# ----- protobuf -----------------------------------------------------------------


def test_to_proto(library: TemplateLibrary) -> None:
    message = to_proto(library.get("sd15-txt2img"))
    specs = {spec.name: spec for spec in message.parameters}
    assert message.name == "sd15-txt2img"
    assert specs["prompt"].type == gen.ParameterType.PARAMETER_TYPE_STRING
    assert specs["prompt"].required and specs["prompt"].max_length == 10000
    assert not specs["seed"].HasField("default_value")
    assert specs["steps"].default_value.int_value == 20
    assert specs["steps"].minimum == 1 and specs["steps"].maximum == 150
    assert specs["cfg"].default_value.number_value == 7.0
    assert specs["sampler"].type == gen.ParameterType.PARAMETER_TYPE_ENUM
    assert "euler" in specs["sampler"].choices
    assert not specs["sampler"].HasField("minimum")
    image = {s.name: s for s in to_proto(library.get("img2img")).parameters}["image"]
    assert image.type == gen.ParameterType.PARAMETER_TYPE_IMAGE


def test_values_from_proto(library: TemplateLibrary) -> None:
    values = values_from_proto(
        {
            "prompt": gen.ParameterValue(string_value="cat"),
            "steps": gen.ParameterValue(int_value=30),
            "cfg": gen.ParameterValue(number_value=6.5),
            "image": gen.ParameterValue(image_name="in.png"),
        }
    )
    assert values == {"prompt": "cat", "steps": 30, "cfg": 6.5, "image": ImageRef("in.png")}
    resolved = library.resolve("img2img", values)
    assert resolved.image_inputs == {"image": "in.png"}
    assert resolved.graph["10"]["inputs"]["image"] == "in.png"
    with pytest.raises(InvalidArgument) as caught:
        values_from_proto({"prompt": gen.ParameterValue()})
    assert violation_fields(caught.value) == ["parameters.prompt"]
    # A plain string naming an image is still not an image reference.
    with pytest.raises(InvalidArgument):
        library.resolve(
            "img2img",
            values_from_proto(
                {
                    "prompt": gen.ParameterValue(string_value="cat"),
                    "image": gen.ParameterValue(string_value="in.png"),
                }
            ),
        )


# ----- properties ---------------------------------------------------------------

# NUL is the one character refused (tested above); everything else is stored as is.
INJECTIONS = ['"}, "4": {"class_type": "Evil"', "{{prompt}}", "${seed}", "'\n\r\t\\", "\u202e"]
prompts = st.text(
    alphabet=st.characters(blacklist_characters="\x00"), max_size=300
) | st.sampled_from(INJECTIONS)


@PROPERTY
@given(prompt=prompts, negative=prompts)
def test_any_string_only_changes_its_targets(
    library: TemplateLibrary, prompt: str, negative: str
) -> None:
    resolved = library.resolve(
        "sd15-txt2img", {"prompt": prompt, "negative_prompt": negative}, rng=random.Random(0)
    )
    assert resolved.graph == expected_graph(resolved)
    assert resolved.graph["6"]["inputs"]["text"] == prompt
    assert resolved.graph["7"]["inputs"]["text"] == negative
    assert json.loads(json.dumps(resolved.graph))["6"]["inputs"]["text"] == prompt
    assert set(resolved.graph) == set(resolved.template.graph)


def test_one_megabyte_string_is_stored_verbatim(tmp_path: Path) -> None:
    write_template(tmp_path, "big", BIG_GRAPH, BIG_YAML)
    library = TemplateLibrary.load(tmp_path)
    prompt = ("\"}\n{{x}}'" + "é" * 100) * 10_000
    assert len(prompt) >= 1_000_000
    resolved = library.resolve("big", {"prompt": prompt})
    assert resolved.graph["1"]["inputs"]["text"] == prompt
    expected = copy.deepcopy(BIG_GRAPH)
    expected["1"]["inputs"]["text"] = prompt
    assert resolved.graph == expected
    assert BIG_GRAPH["1"]["inputs"]["text"] == ""


@PROPERTY
@given(steps=st.integers(min_value=-5, max_value=160) | st.integers())
def test_integer_accepted_iff_within_bounds(library: TemplateLibrary, steps: int) -> None:
    values = {"prompt": "x", "steps": steps}
    if 1 <= steps <= 150:
        assert library.resolve("sd15-txt2img", values).graph["3"]["inputs"]["steps"] == steps
    else:
        with pytest.raises(InvalidArgument) as caught:
            library.resolve("sd15-txt2img", values)
        assert violation_fields(caught.value) == ["parameters.steps"]


@PROPERTY
@given(seed=st.integers(min_value=-3, max_value=3) | st.integers(SEED_MAX - 3, SEED_MAX + 3))
def test_seed_bounds_are_exact(library: TemplateLibrary, seed: int) -> None:
    values = {"prompt": "x", "seed": seed}
    if 0 <= seed <= SEED_MAX:
        assert library.resolve("sd15-txt2img", values).graph["3"]["inputs"]["seed"] == seed
    else:
        with pytest.raises(InvalidArgument):
            library.resolve("sd15-txt2img", values)


bad_values = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(ImageRef, st.text(max_size=5)),
)


@PROPERTY
@given(name=st.sampled_from(["steps", "seed", "width", "batch_size"]), value=bad_values)
def test_non_integers_never_reach_the_graph(
    library: TemplateLibrary, name: str, value: Any
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        library.resolve("sd15-txt2img", {"prompt": "x", name: value})
    assert violation_fields(caught.value) == [f"parameters.{name}"]


@PROPERTY
@given(
    name=st.sampled_from(["sampler", "scheduler", "checkpoint", "negative_prompt", "cfg"]),
    value=bad_values,
)
def test_bad_values_always_raise(library: TemplateLibrary, name: str, value: Any) -> None:
    param = library.get("sd15-txt2img").parameters[name]
    acceptable = (
        (param.type == "enum" and value in param.choices)
        or (param.type == "string" and isinstance(value, str) and "\x00" not in value)
        or (param.type == "number" and isinstance(value, float) and 0.0 <= value <= 30.0)
    )
    values = {"prompt": "x", name: value}
    if acceptable:
        library.resolve("sd15-txt2img", values)
        return
    with pytest.raises(InvalidArgument) as caught:
        library.resolve("sd15-txt2img", values)
    assert violation_fields(caught.value) == [f"parameters.{name}"]
