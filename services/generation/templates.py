"""ComfyUI workflow templates: an API-format graph plus a typed parameter declaration.

Each template NAME is `NAME.json` (the graph exactly as ComfyUI's "Save (API)"
writes it) and `NAME.yaml` (its description and parameters). Resolving a
template checks every caller value against its declaration and writes the
values into a deep copy of the parsed graph, input by input, so no value can
ever change the graph's shape: there is no text substitution anywhere.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.contracts import gen
from services.errors import InvalidArgument, NotFound, Reason

TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PARAMETER_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
# Same alphabet the API allows for input image names; no leading dot, so never "." or "..".
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
TYPES = ("string", "integer", "number", "boolean", "enum", "image")
DEFAULT_MAX_LENGTH = 10_000
# Drawn values are reported back through ParameterValue.int_value (int64), so a
# random draw never goes above it even when the declared maximum does.
INT64_MAX = 2**63 - 1
CHECKPOINTS = "checkpoints"
_SPEC_KEYS = frozenset(
    {
        "type",
        "description",
        "required",
        "default",
        "minimum",
        "maximum",
        "choices",
        "max_length",
        "targets",
        "random",
        "model",
    }
)
_LISTED_MODELS = 20


@dataclass(frozen=True)
class ImageRef:
    """A caller value naming one of the request's input images (not a plain string)."""

    name: str


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    description: str
    required: bool
    default: Any | None
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...]
    max_length: int
    targets: tuple[tuple[str, str], ...]
    random: bool
    model: str | None


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    graph: dict[str, Any]
    parameters: dict[str, Parameter]
    source: Path

    @functools.cached_property
    def graph_json(self) -> str:
        """The graph as JSON text, parsed anew for each request's own copy:
        json.loads copies it in a quarter of the time copy.deepcopy takes."""
        return json.dumps(self.graph)


@dataclass(frozen=True)
class Resolved:
    template: Template
    graph: dict[str, Any]
    # Final values including defaults and drawn random values; image params hold the name.
    parameters: dict[str, Any]
    checkpoint: str | None
    # Parameter name -> the caller's image name, which the graph holds until the
    # worker uploads the image and rewrites the input to the uploaded name.
    image_inputs: dict[str, str]


class TemplateError(Exception):
    """Why one template file cannot be used; reported in TemplateLibrary.errors."""

    def __init__(self, message: str, file: str = "") -> None:
        super().__init__(message)
        self.file = file


# ----- value checking -----------------------------------------------------------


def check_value(param: Parameter, value: Any) -> str | None:
    """Why `value` is not acceptable for `param`, or None when it is."""
    kind = param.type
    if kind == "image":
        if not isinstance(value, ImageRef):
            return f"expected an image reference, got {_type_name(value)}"
        if not IMAGE_NAME.fullmatch(value.name):
            return "image name must be 1-255 letters, digits, '.', '_' or '-' (no leading '.')"
        return None
    if kind in ("string", "enum"):
        if not isinstance(value, str):
            return f"expected a string, got {_type_name(value)}"
        if "\x00" in value:
            return "must not contain NUL characters"
        if kind == "enum":
            if value not in param.choices:
                return f"{_short(value)!r} is not one of: {', '.join(param.choices)}"
            return None
        if len(value) > param.max_length:
            return f"longer than {param.max_length} characters ({len(value)})"
        return None
    if kind == "boolean":
        return None if isinstance(value, bool) else f"expected a boolean, got {_type_name(value)}"
    if kind == "integer":
        # bool is an int subclass, but True as a step count is a caller bug.
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {_type_name(value)}"
        return _check_range(param, value)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {_type_name(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        return _check_range(param, value)
    return f"unsupported parameter type {kind!r}"


def _check_range(param: Parameter, value: float) -> str | None:
    if param.minimum is not None and value < param.minimum:
        return f"must be at least {_num(param.minimum)} (got {value})"
    if param.maximum is not None and value > param.maximum:
        return f"must be at most {_num(param.maximum)} (got {value})"
    return None


def _num(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(value)


def _type_name(value: Any) -> str:
    if isinstance(value, ImageRef):
        return "an image reference"
    if value is None:
        return "null"
    return type(value).__name__


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _graph_value(param: Parameter, value: Any) -> Any:
    if isinstance(value, ImageRef):
        return value.name
    if param.type == "number":
        return float(value)
    return value


# ----- loading --------------------------------------------------------------------


def _parse_graph(path: Path) -> dict[str, Any]:
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise TemplateError(f"invalid JSON: {exc}") from exc
    if not isinstance(graph, dict) or not graph:
        raise TemplateError("graph must be a non-empty object of node id -> node (API format)")
    for node_id, node in graph.items():
        if not isinstance(node, dict):
            raise TemplateError(f"node {node_id!r} is not an object")
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise TemplateError(f"node {node_id!r} has no class_type (export with Save (API))")
        if not isinstance(node.get("inputs", {}), dict):
            raise TemplateError(f"node {node_id!r}: inputs must be an object")
        for name, value in node.get("inputs", {}).items():
            if _is_link(value) and value[0] not in graph:
                raise TemplateError(f"node {node_id!r} input {name!r} links to missing node")
    return graph


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def _parse_declaration(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise TemplateError(f"invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise TemplateError("declaration must be a mapping with 'parameters'")
    unknown = set(data) - {"description", "parameters"}
    if unknown:
        raise TemplateError(f"unknown keys: {', '.join(sorted(map(str, unknown)))}")
    return data


def _number(spec: Mapping[str, Any], key: str, where: str) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TemplateError(f"{where}: {key} must be a number")
    return value


def _parameter(name: Any, spec: Any, graph: Mapping[str, Any]) -> Parameter:
    where = f"parameter {name!r}"
    if not isinstance(name, str) or not PARAMETER_NAME.fullmatch(name):
        raise TemplateError(f"{where}: name must match {PARAMETER_NAME.pattern}")
    if not isinstance(spec, dict):
        raise TemplateError(f"{where}: must be a mapping")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise TemplateError(f"{where}: unknown keys: {', '.join(sorted(map(str, unknown)))}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise TemplateError(f"{where}: type must be one of {', '.join(TYPES)}")
    description = spec.get("description", "")
    required = spec.get("required", False)
    is_random = spec.get("random", False)
    model = spec.get("model")
    if not isinstance(description, str):
        raise TemplateError(f"{where}: description must be a string")
    if not isinstance(required, bool) or not isinstance(is_random, bool):
        raise TemplateError(f"{where}: required and random must be booleans")
    if model is not None and (not isinstance(model, str) or kind != "string"):
        raise TemplateError(f"{where}: model is only for string parameters and must be a string")
    choices = spec.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TemplateError(f"{where}: choices must be a list of strings")
    if (kind == "enum") != bool(choices):
        raise TemplateError(f"{where}: enum parameters (and only they) need choices")
    max_length = spec.get("max_length", DEFAULT_MAX_LENGTH if kind == "string" else 0)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0:
        raise TemplateError(f"{where}: max_length must be a non-negative integer")
    if kind != "string" and "max_length" in spec:
        raise TemplateError(f"{where}: max_length is only for strings")
    minimum, maximum = _number(spec, "minimum", where), _number(spec, "maximum", where)
    if (minimum is not None or maximum is not None) and kind not in ("integer", "number"):
        raise TemplateError(f"{where}: minimum/maximum are only for integers and numbers")
    if kind == "integer" and any(isinstance(v, float) for v in (minimum, maximum)):
        raise TemplateError(f"{where}: integer bounds must be integers")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise TemplateError(f"{where}: minimum is above maximum")
    if is_random and (kind != "integer" or minimum is None or maximum is None):
        raise TemplateError(f"{where}: random needs an integer with minimum and maximum")
    if is_random and minimum is not None and minimum > INT64_MAX:
        raise TemplateError(f"{where}: random range must include int64 values")
    targets = _targets(spec.get("targets"), graph, where)
    param = Parameter(
        name=name,
        type=kind,
        description=description,
        required=required,
        default=spec.get("default"),
        minimum=minimum,
        maximum=maximum,
        choices=tuple(choices),
        max_length=max_length,
        targets=targets,
        random=is_random,
        model=model,
    )
    if param.default is not None:
        if kind == "image":
            raise TemplateError(f"{where}: image parameters cannot have a default")
        if required:
            raise TemplateError(f"{where}: a required parameter cannot have a default")
        problem = check_value(param, param.default)
        if problem is not None:
            raise TemplateError(f"{where}: default: {problem}")
        if kind == "integer" and not -INT64_MAX - 1 <= param.default <= INT64_MAX:
            # Defaults are published as ParameterValue.int_value, an int64.
            raise TemplateError(f"{where}: default must fit in a 64-bit signed integer")
    return param


def _targets(raw: Any, graph: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise TemplateError(f"{where}: targets must be a non-empty list of 'node_id.input'")
    found: list[tuple[str, str]] = []
    for target in raw:
        # Input names never contain dots; node ids may (subgraph ids), so split on the last.
        node_id, dot, input_name = str(target).rpartition(".")
        if not isinstance(target, str) or not dot or not node_id or not input_name:
            raise TemplateError(f"{where}: target {target!r} is not 'node_id.input'")
        node = graph.get(node_id)
        if node is None:
            raise TemplateError(f"{where}: target {target!r}: no node {node_id!r} in the graph")
        inputs = node.get("inputs", {})
        if input_name not in inputs:
            raise TemplateError(
                f"{where}: target {target!r}: node {node_id!r} ({node['class_type']}) "
                f"has no input {input_name!r}"
            )
        if _is_link(inputs[input_name]):
            raise TemplateError(f"{where}: target {target!r} is a link, not a value")
        found.append((node_id, input_name))
    return tuple(found)


def load_template(json_path: Path, yaml_path: Path) -> Template:
    """Parse and validate one template pair; raises TemplateError naming the bad file."""
    try:
        graph = _parse_graph(json_path)
    except TemplateError as exc:
        raise TemplateError(str(exc), json_path.name) from exc
    try:
        return _declare(json_path, graph, _parse_declaration(yaml_path))
    except TemplateError as exc:
        raise TemplateError(str(exc), yaml_path.name) from exc


def _declare(json_path: Path, graph: dict[str, Any], data: Mapping[str, Any]) -> Template:
    description = data.get("description", "")
    if not isinstance(description, str):
        raise TemplateError("description must be a string")
    raw_params = data.get("parameters") or {}
    if not isinstance(raw_params, dict):
        raise TemplateError("parameters must be a mapping of name -> spec")
    parameters: dict[str, Parameter] = {}
    claimed: dict[tuple[str, str], str] = {}
    for name, spec in raw_params.items():
        param = _parameter(name, spec, graph)
        for target in param.targets:
            if target in claimed:
                raise TemplateError(
                    f"parameter {name!r}: target {'.'.join(target)!r} "
                    f"is already set by {claimed[target]!r}"
                )
            claimed[target] = name
        parameters[name] = param
    if sum(p.model == CHECKPOINTS for p in parameters.values()) > 1:
        raise TemplateError("at most one parameter may have model: checkpoints")
    return Template(
        name=json_path.stem,
        description=description,
        graph=graph,
        parameters=parameters,
        source=json_path,
    )


# ----- the library --------------------------------------------------------------


class TemplateLibrary:
    """Every template of one directory, loaded up front; broken ones land in `errors`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.errors: dict[str, str] = {}
        self._templates: dict[str, Template] = {}
        self._signature: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def load(cls, directory: Path) -> TemplateLibrary:
        library = cls(Path(directory))
        library.reload()
        return library

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = [
                (p.name, p.stat().st_mtime_ns, p.stat().st_size)
                for p in self.directory.iterdir()
                if p.suffix in (".json", ".yaml") and p.is_file()
            ]
        except OSError:
            return ()
        return tuple(sorted(entries))

    def reload(self) -> None:
        signature = self._scan()
        templates: dict[str, Template] = {}
        errors: dict[str, str] = {}
        if not self.directory.is_dir():
            errors[str(self.directory)] = "template directory does not exist"
        stems: dict[str, set[str]] = {}
        for file_name, _, _ in signature:
            path = Path(file_name)
            stems.setdefault(path.stem, set()).add(path.suffix)
        for stem, suffixes in sorted(stems.items()):
            if not TEMPLATE_NAME.fullmatch(stem):
                for suffix in sorted(suffixes):
                    errors[stem + suffix] = f"template name must match {TEMPLATE_NAME.pattern}"
                continue
            if suffixes != {".json", ".yaml"}:
                have = next(iter(suffixes))
                missing = ".yaml" if have == ".json" else ".json"
                errors[stem + have] = f"no matching {stem}{missing}"
                continue
            json_path = self.directory / f"{stem}.json"
            yaml_path = self.directory / f"{stem}.yaml"
            try:
                templates[stem] = load_template(json_path, yaml_path)
            except TemplateError as exc:
                errors[exc.file or yaml_path.name] = str(exc)
        # Swapped whole so concurrent readers see either the old or the new set.
        self._templates, self.errors, self._signature = templates, errors, signature

    def reload_if_changed(self) -> bool:
        if self._scan() == self._signature:
            return False
        self.reload()
        return True

    def templates(self) -> list[Template]:
        return [self._templates[name] for name in sorted(self._templates)]

    def get(self, name: str) -> Template:
        if not isinstance(name, str) or not TEMPLATE_NAME.fullmatch(name):
            raise InvalidArgument.field(
                "template", f"must match {TEMPLATE_NAME.pattern} (got {_short(str(name))!r})"
            )
        # Only the loaded set is consulted: a name never becomes a path.
        template = self._templates.get(name)
        if template is None:
            known = ", ".join(sorted(self._templates)) or "none"
            raise NotFound(
                f"template {name!r} not found (known: {known})",
                reason=Reason.TEMPLATE_NOT_FOUND.value,
            )
        return template

    def resolve(
        self,
        name: str,
        values: Mapping[str, Any],
        *,
        available_checkpoints: Collection[str] | None = None,
        available_models: Mapping[str, Collection[str]] | None = None,
        rng: random.Random | None = None,
    ) -> Resolved:
        return resolve(
            self.get(name),
            values,
            available_checkpoints=available_checkpoints,
            available_models=available_models,
            rng=rng,
        )


def resolve(
    template: Template,
    values: Mapping[str, Any],
    *,
    available_checkpoints: Collection[str] | None = None,
    available_models: Mapping[str, Collection[str]] | None = None,
    rng: random.Random | None = None,
) -> Resolved:
    """Check `values` against the template and set them into a copy of its graph.

    `available_models` maps a model kind (a parameter's `model:`) to the names
    workers have; `available_checkpoints` is the same for checkpoints alone."""
    violations: list[tuple[str, str]] = []
    params = template.parameters
    for name in values:
        if name not in params:
            known = ", ".join(params) or "none"
            violations.append((f"parameters.{name}", f"unknown parameter (known: {known})"))
    final: dict[str, Any] = {}
    for name, param in params.items():
        field = f"parameters.{name}"
        if name in values:
            value = values[name]
            problem = check_value(param, value)
            if problem is not None:
                violations.append((field, problem))
                continue
            final[name] = value
        elif param.default is not None:
            final[name] = param.default
        elif param.random:
            assert param.minimum is not None and param.maximum is not None
            generator = rng if rng is not None else random.SystemRandom()
            final[name] = generator.randint(int(param.minimum), min(int(param.maximum), INT64_MAX))
        elif param.required:
            violations.append((field, "required parameter is missing"))
    checkpoint_param = next((p for p in params.values() if p.model == CHECKPOINTS), None)
    checkpoint = final.get(checkpoint_param.name) if checkpoint_param is not None else None
    # Every model a parameter names (checkpoint, upscaler...) must be one the
    # workers reported, when they reported that kind: a name that is not one
    # is never queued, however it is spelt (paths that climb out included).
    models = dict(available_models or {})
    if available_checkpoints is not None:
        models[CHECKPOINTS] = available_checkpoints
    missing_models = 0
    for param in params.values():
        known_models = models.get(param.model) if param.model else None
        value = final.get(param.name)
        if known_models is not None and value is not None and value not in known_models:
            missing_models += 1
            violations.append(
                (f"parameters.{param.name}", _unknown_model(param, value, known_models))
            )
    if violations:
        only_model = missing_models == len(violations)
        raise InvalidArgument(
            violations, reason=Reason.MODEL_NOT_FOUND.value if only_model else None
        )
    graph = json.loads(template.graph_json)
    image_inputs: dict[str, str] = {}
    reported: dict[str, Any] = {}
    for name, value in final.items():
        param = params[name]
        for node_id, input_name in param.targets:
            graph[node_id]["inputs"][input_name] = _graph_value(param, value)
        if isinstance(value, ImageRef):
            image_inputs[name] = value.name
            reported[name] = value.name
        else:
            reported[name] = value
    return Resolved(
        template=template,
        graph=graph,
        parameters=reported,
        checkpoint=checkpoint,
        image_inputs=image_inputs,
    )


def _unknown_model(param: Parameter, name: str, available: Collection[str]) -> str:
    names = sorted(available)
    listed = ", ".join(names[:_LISTED_MODELS]) or "none"
    if len(names) > _LISTED_MODELS:
        listed += f", ... ({len(names) - _LISTED_MODELS} more)"
    kind = "checkpoint" if param.model == CHECKPOINTS else f"model ({param.model})"
    return f"{kind} {_short(name)!r} is not available (available: {listed})"


# ----- protobuf -----------------------------------------------------------------

_PROTO_TYPES = {
    "string": gen.ParameterType.PARAMETER_TYPE_STRING,
    "integer": gen.ParameterType.PARAMETER_TYPE_INTEGER,
    "number": gen.ParameterType.PARAMETER_TYPE_NUMBER,
    "boolean": gen.ParameterType.PARAMETER_TYPE_BOOLEAN,
    "enum": gen.ParameterType.PARAMETER_TYPE_ENUM,
    "image": gen.ParameterType.PARAMETER_TYPE_IMAGE,
}


def to_proto_value(param: Parameter, value: Any) -> gen.ParameterValue:
    if param.type == "boolean":
        return gen.ParameterValue(bool_value=bool(value))
    if param.type == "integer":
        return gen.ParameterValue(int_value=int(value))
    if param.type == "number":
        return gen.ParameterValue(number_value=float(value))
    if isinstance(value, ImageRef):
        return gen.ParameterValue(image_name=value.name)
    if param.type == "image":
        return gen.ParameterValue(image_name=str(value))
    return gen.ParameterValue(string_value=str(value))


def to_proto(template: Template) -> gen.Template:
    specs = []
    for param in template.parameters.values():
        spec = gen.ParameterSpec(
            name=param.name,
            type=_PROTO_TYPES[param.type],
            description=param.description,
            required=param.required,
            choices=list(param.choices),
            max_length=param.max_length,
        )
        if param.default is not None:
            spec.default_value.CopyFrom(to_proto_value(param, param.default))
        if param.minimum is not None:
            spec.minimum = float(param.minimum)
        if param.maximum is not None:
            spec.maximum = float(param.maximum)
        specs.append(spec)
    return gen.Template(name=template.name, description=template.description, parameters=specs)


def values_from_proto(params: Mapping[str, gen.ParameterValue]) -> dict[str, Any]:
    """Plain Python values; image names become ImageRef so resolve can tell them apart."""
    values: dict[str, Any] = {}
    unset: list[tuple[str, str]] = []
    for name, value in params.items():
        kind = value.WhichOneof("kind")
        if kind is None:
            unset.append((f"parameters.{name}", "no value set"))
        elif kind == "image_name":
            values[name] = ImageRef(value.image_name)
        else:
            values[name] = getattr(value, kind)
    if unset:
        raise InvalidArgument(unset)
    return values
