"""docker-compose.yml and deploy/k8s checked against what the code reads.

No Docker engine or cluster runs here, so these tests parse the files and hold
them to the code: every LOCKN_ variable names a real setting and parses, every
probe targets the port the process listens on, every command is a real
subcommand, and services point at each other by the names and ports they use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from services.cli import build_parser
from services.contracts import gen, worker
from services.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
OUR_SERVICES = {"comfy-worker", "generation-service", "gateway"}
GRPC_NAMES = {
    gen.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    worker.DESCRIPTOR.services_by_name["ComfyWorkerService"].full_name,
}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def substitute_defaults(value: str) -> str:
    """What compose makes of `${VAR:-default}` when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def setting_exists(variable: str) -> bool:
    if variable == "DATABASE_URL":
        return True
    if not variable.startswith("LOCKN_"):
        return False
    model: type[BaseModel] = Settings
    parts = variable.removeprefix("LOCKN_").lower().split("__")
    for part in parts[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return False
        model = field.annotation
    return parts[-1] in model.model_fields


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, substitute_defaults(str(value)))
    return load_settings()


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_compose_runs_the_whole_stack() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "comfyui", "migrate", *OUR_SERVICES}
    devices = services["comfyui"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert "COMFYUI_IMAGE" in services["comfyui"]["image"]
    assert services["postgres"]["volumes"] and services["postgres"]["healthcheck"]


@pytest.mark.parametrize("name", sorted(OUR_SERVICES))
def test_compose_settings_are_real_and_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = compose()["services"][name]
    env = service["environment"]
    unknown = [key for key in env if not setting_exists(key)]
    assert unknown == [], f"{name} sets variables no code reads: {unknown}"
    settings = settings_from(env, monkeypatch)
    command = service["command"]
    args = build_parser().parse_args(command)
    assert args.command == command[0]
    listen = {
        "comfy-worker": settings.worker_listen,
        "generation-service": settings.generation_listen,
        "gateway": settings.gateway_listen,
    }[name]
    probe = service["healthcheck"]["test"]
    if name == "gateway":
        assert f":{port_of(listen)}/readyz" in " ".join(probe)
    else:
        assert probe[1:4] == ["lockn-gen", "probe", "--address"]
        assert port_of(probe[4]) == port_of(listen)


def test_compose_services_reach_each_other_by_name_and_listening_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    generation = settings_from(services["generation-service"]["environment"], monkeypatch)
    worker_settings = settings_from(services["comfy-worker"]["environment"], monkeypatch)
    gateway = settings_from(services["gateway"]["environment"], monkeypatch)
    assert [w.address for w in generation.workers] == [
        f"comfy-worker:{port_of(worker_settings.worker_listen)}"
    ]
    assert gateway.generation_address == (
        f"generation-service:{port_of(generation.generation_listen)}"
    )
    assert str(worker_settings.comfyui.base_url).startswith("http://comfyui:8188")
    assert generation.database_dsn.split("@")[1].startswith("postgres:5432/")
    assert services["generation-service"]["depends_on"]["postgres"]["condition"] == (
        "service_healthy"
    )
    assert "generation-service" in services["gateway"]["depends_on"]
    assert "comfyui" in services["comfy-worker"]["depends_on"]


def test_compose_migrates_once_before_generation_service_starts() -> None:
    services = compose()["services"]
    migrate, generation = services["migrate"], services["generation-service"]
    assert build_parser().parse_args(migrate["command"]).command == "migrate"
    assert migrate["restart"] == "no"  # a one-shot: the stack's default would rerun it forever
    assert [key for key in migrate["environment"] if not setting_exists(key)] == []
    assert migrate["environment"]["DATABASE_URL"] == generation["environment"]["DATABASE_URL"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert generation["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def workloads() -> list[dict[str, Any]]:
    return [d for d in k8s_documents() if d["kind"] in {"Deployment", "StatefulSet"}]


def config_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for doc in k8s_documents():
        if doc["kind"] == "ConfigMap":
            env.update(doc["data"])
        if doc["kind"] == "Secret":
            env.update(doc["stringData"])
    return env


def test_every_workload_container_is_probed_and_sized(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = 0
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert container["resources"]["requests"], container["name"]
            assert "readinessProbe" in container and "livenessProbe" in container
            if container["image"] != "lockn-gen":
                continue
            ours += 1
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert [k for k in {**config_env(), **env} if not setting_exists(k)] == []
            settings = settings_from({**config_env(), **env}, monkeypatch)
            args = build_parser().parse_args(container["args"])
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            probe = container["readinessProbe"]
            if args.command == "gateway":
                assert ports["http"] == port_of(settings.gateway_listen)
                continue
            listen = (
                settings.generation_listen
                if args.command == "generation-service"
                else settings.worker_listen
            )
            assert probe["grpc"]["port"] == ports["grpc"] == port_of(listen)
            assert probe["grpc"]["service"] in GRPC_NAMES
    assert ours == 3


def test_generation_service_survives_a_node_drain() -> None:
    deployment = next(w for w in workloads() if w["metadata"]["name"] == "generation-service")
    pdb = next(d for d in k8s_documents() if d["kind"] == "PodDisruptionBudget")
    assert deployment["spec"]["replicas"] >= 2
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_generation_service_migrates_before_it_starts_and_is_probed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployment = next(w for w in workloads() if w["metadata"]["name"] == "generation-service")
    pod = deployment["spec"]["template"]["spec"]
    (service,) = pod["containers"]
    (init,) = pod["initContainers"]
    assert build_parser().parse_args(init["args"]).command == "migrate"
    assert "livenessProbe" not in init and "startupProbe" not in init
    assert init["image"] == service["image"]
    assert init["envFrom"] == service["envFrom"]  # the same database
    assert init["resources"]["requests"]
    assert "env" not in init
    assert settings_from(config_env(), monkeypatch).database_dsn  # the config alone is enough


def test_services_select_existing_pods() -> None:
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads()]
    for service in (d for d in k8s_documents() if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= pod.items() for pod in labels), service["metadata"]


def test_listed_workers_are_the_gpu_pods_stable_names() -> None:
    gpu = next(w for w in workloads() if w["kind"] == "StatefulSet")
    containers = gpu["spec"]["template"]["spec"]["containers"]
    assert any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers)
    names = {
        f"{gpu['metadata']['name']}-{i}.{gpu['spec']['serviceName']}:50052"
        for i in range(gpu["spec"]["replicas"])
    }
    listed = {w["address"] for w in json.loads(config_env()["LOCKN_WORKERS"])}
    assert listed == names
