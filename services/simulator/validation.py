"""ComfyUI's /prompt validation, reproduced from the recorded error bodies.

Given a graph and the object_info the simulator serves, it returns what real
ComfyUI answers: nothing (valid), an `invalid_prompt`/`prompt_no_outputs`
error with empty node_errors, or `prompt_outputs_failed_validation` with
per-node errors of the recorded types and wording.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

OUTPUT_CLASSES = {"SaveImage", "PreviewImage"}
JsonDict = dict[str, Any]


def error(kind: str, message: str, details: str = "") -> JsonDict:
    return {
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    }


def combo_options(spec: list[Any]) -> list[Any] | None:
    """Both shapes: [[...names], {...}] and ["COMBO", {"options": [...]}]."""
    if spec and isinstance(spec[0], list):
        return spec[0]
    if spec and spec[0] == "COMBO" and len(spec) > 1:
        return list(spec[1].get("options", []))
    return None


def validate(
    graph: Any, object_info: Mapping[str, Any], input_exists: Callable[[str], bool]
) -> tuple[JsonDict | None, list[str]]:
    """(error body or None, output node ids)."""
    if not isinstance(graph, dict):
        return error("invalid_prompt", "Cannot execute because the prompt is not a dict."), []
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            ), []
        if node["class_type"] not in object_info:
            return error(
                "invalid_prompt",
                f"Cannot execute because node {node['class_type']} does not exist.",
                f"Node ID '#{node_id}'",
            ), []
    outputs = [i for i, n in graph.items() if object_info[n["class_type"]].get("output_node")]
    if not outputs:
        return error("prompt_no_outputs", "Prompt has no outputs"), []
    node_errors: JsonDict = {}
    details = ""
    for output in outputs:
        for node_id, errors in _validate_upstream(graph, output, object_info, input_exists).items():
            entry = node_errors.setdefault(
                node_id,
                {"errors": errors, "dependent_outputs": [], "class_type": _class(graph, node_id)},
            )
            entry["dependent_outputs"].append(output)
            if errors and errors[0]["type"] == "exception_during_validation":
                details = f"Exception when validating node: {errors[0]['details']}"
            elif errors and errors[0]["type"] == "required_input_missing" and node_id == output:
                details = f"Required input is missing: {errors[0]['details']}"
    if node_errors:
        body = error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
        )
        body["node_errors"] = node_errors
        return body, []
    return None, outputs


def _class(graph: Mapping[str, Any], node_id: str) -> str:
    node = graph.get(node_id)
    return str(node["class_type"]) if isinstance(node, dict) else ""


def _validate_upstream(
    graph: Mapping[str, Any],
    node_id: str,
    object_info: Mapping[str, Any],
    input_exists: Callable[[str], bool],
    seen: set[str] | None = None,
) -> dict[str, list[JsonDict]]:
    seen = seen if seen is not None else set()
    if node_id in seen:
        return {}
    seen.add(node_id)
    node = graph[node_id]
    spec = object_info[node["class_type"]]["input"]
    required: Mapping[str, Any] = spec.get("required", {})
    optional: Mapping[str, Any] = spec.get("optional", {})
    inputs: Mapping[str, Any] = node.get("inputs", {})
    found: dict[str, list[JsonDict]] = {}
    errors: list[JsonDict] = []
    for name, config in [*required.items(), *optional.items()]:
        if name not in inputs:
            if name in required:
                errors.append(_missing(name))
            continue
        value = inputs[name]
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            if value[0] not in graph:
                errors.append(_link_error(value[0]))
                continue
            found.update(_validate_upstream(graph, value[0], object_info, input_exists, seen))
            continue
        problem = _check_value(node["class_type"], name, config, value, input_exists)
        if problem is not None:
            errors.append(problem)
    if errors:
        found[node_id] = errors
    return found


def _missing(name: str) -> JsonDict:
    return {
        "type": "required_input_missing",
        "message": "Required input is missing",
        "details": name,
        "extra_info": {"input_name": name},
    }


def _link_error(target: str) -> JsonDict:
    return {
        "type": "exception_during_validation",
        "message": "Exception when validating node",
        "details": f"'{target}'",
        "extra_info": {"exception_type": "KeyError", "traceback": list(_LINK_TRACEBACK)},
    }


# The frames real ComfyUI 0.3.64 reports for a link to a missing node.
_LINK_TRACEBACK = (
    '  File "/home/user1/ComfyUI/execution.py", line 1010, in validate_prompt\n'
    "    m = await validate_inputs(prompt_id, prompt, o, validated)\n"
    "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
    '  File "/home/user1/ComfyUI/execution.py", line 788, in validate_inputs\n'
    "    o_class_type = prompt[o_id]['class_type']\n"
    "                   ~~~~~~^^^^^^\n",
)


def _check_value(
    class_type: str, name: str, config: list[Any], value: Any, input_exists: Callable[[str], bool]
) -> JsonDict | None:
    kind = config[0] if config else None
    options = config[1] if len(config) > 1 and isinstance(config[1], dict) else {}
    extra = {"input_name": name, "input_config": config, "received_value": value}
    choices = combo_options(config)
    if class_type == "LoadImage" and name == "image":
        if isinstance(value, str) and input_exists(value):
            return None
        return {
            "type": "custom_validation_failed",
            "message": "Custom validation failed for node",
            "details": f"image - Invalid image file: {value}",
            "extra_info": {"input_name": name},
        }
    if choices is not None:
        if value not in choices:
            return {
                "type": "value_not_in_list",
                "message": "Value not in list",
                "details": f"{name}: '{value}' not in {_python_list(choices)}",
                "extra_info": extra,
            }
        return None
    if kind in ("INT", "FLOAT"):
        convert = int if kind == "INT" else float
        try:
            if isinstance(value, (bool, list, dict)):
                raise ValueError(
                    f"invalid literal for {convert.__name__}() with base 10: {value!r}"
                )
            number = convert(value)
        except (TypeError, ValueError) as exc:
            return {
                "type": "invalid_input_type",
                "message": f"Failed to convert an input value to a {kind} value",
                "details": f"{name}, {value}, {exc}",
                "extra_info": extra | {"exception_message": str(exc)},
            }
        if "max" in options and number > options["max"]:
            return {
                "type": "value_bigger_than_max",
                "message": f"Value {number} bigger than max of {options['max']}",
                "details": name,
                "extra_info": extra,
            }
        if "min" in options and number < options["min"]:
            return {
                "type": "value_smaller_than_min",
                "message": f"Value {number} smaller than min of {options['min']}",
                "details": name,
                "extra_info": extra,
            }
    if kind == "STRING" and not isinstance(value, str):
        return {
            "type": "invalid_input_type",
            "message": "Failed to convert an input value to a STRING value",
            "details": f"{name}, {value}",
            "extra_info": extra,
        }
    return None


def _python_list(values: Collection[Any]) -> str:
    return "[" + ", ".join(repr(v) for v in values) + "]"
