"""Every shipped template, resolved, passes the ComfyUI simulator's /prompt validation.

The simulator's validation is called directly with the object_info it serves
(model lists filled from its defaults) and the same "does this input image
exist" check its /prompt route uses, so no server or event loop is needed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.generation.templates import ImageRef, Template, TemplateLibrary
from services.simulator import validation
from services.simulator.app import DEFAULT_CHECKPOINTS, Simulator, SimulatorOptions

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
LIBRARY = TemplateLibrary.load(WORKFLOWS)
NAMES = [t.name for t in LIBRARY.templates()]
IMAGE = "template-input.png"


@pytest.fixture
def simulator(tmp_path: Path) -> Simulator:
    sim = Simulator(SimulatorOptions(output_dir=tmp_path))
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(sim.input_path(IMAGE))
    return sim


def input_exists(sim: Simulator, name: str) -> bool:
    # Same rule as the /prompt route: a file of that name in the input folder.
    try:
        return sim.input_path(name).is_file()
    except ValueError:
        return False


def submit(sim: Simulator, graph: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    sim._refresh_input_lists()
    return validation.validate(graph, sim.object_info, lambda name: input_exists(sim, name))


def required_values(template: Template, image: str = IMAGE) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for param in template.parameters.values():
        if param.required:
            values[param.name] = ImageRef(image) if param.type == "image" else "a lighthouse"
    return values


def test_all_templates_loaded() -> None:
    assert LIBRARY.errors == {}
    assert NAMES


@pytest.mark.parametrize("name", NAMES)
def test_template_with_defaults_passes_validation(simulator: Simulator, name: str) -> None:
    template = LIBRARY.get(name)
    resolved = LIBRARY.resolve(
        name,
        required_values(template),
        available_checkpoints=DEFAULT_CHECKPOINTS,
        rng=random.Random(3),
    )
    problem, outputs = submit(simulator, resolved.graph)
    assert problem is None, problem
    assert outputs


@pytest.mark.parametrize("name", NAMES)
def test_template_at_parameter_bounds_passes_validation(simulator: Simulator, name: str) -> None:
    """Anything the declaration accepts must be something ComfyUI accepts."""
    template = LIBRARY.get(name)
    for pick in (min, max):
        values = required_values(template)
        for param in template.parameters.values():
            if param.type in ("integer", "number") and param.minimum is not None:
                assert param.maximum is not None
                values[param.name] = pick(param.minimum, param.maximum)
            elif param.type == "enum":
                values[param.name] = pick(param.choices)
        resolved = LIBRARY.resolve(name, values, available_checkpoints=DEFAULT_CHECKPOINTS)
        problem, _ = submit(simulator, resolved.graph)
        assert problem is None, (pick.__name__, problem)


@pytest.mark.parametrize("name", [n for n in NAMES if "image" in LIBRARY.get(n).parameters])
def test_missing_input_image_is_caught_by_the_simulator(simulator: Simulator, name: str) -> None:
    # Proves the checks above really exercise LoadImage's image validation.
    resolved = LIBRARY.resolve(name, required_values(LIBRARY.get(name), "not-uploaded.png"))
    problem, _ = submit(simulator, resolved.graph)
    assert problem is not None
    assert problem["error"]["type"] == "prompt_outputs_failed_validation"
