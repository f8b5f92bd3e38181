"""docker/ and k8s/: schema-valid offline, and the rules the schemas cannot see.

``kubernetes-validate --strict`` checks every manifest in k8s/base and what ``kustomize
build`` makes of the base and the overlays (when a ``kustomize`` or ``kubectl`` binary is
on the machine; skipped otherwise); ``check-jsonschema`` checks the compose files against
the compose-spec. The rest reads the YAML: probes, non-root, read-only root filesystems,
resources, drain-long grace periods, one way in, real commands, documented variables.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from microshop.cli import SERVICE_MODULES

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "k8s" / "base"
OVERLAYS = sorted(path.parent for path in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))
DOCKER = ROOT / "docker"
COMPOSE_FILES = (DOCKER / "compose.yaml", DOCKER / "compose.hostnet.yaml")
KUBERNETES_VERSION = "1.30.0"
SERVICES = frozenset(SERVICE_MODULES) - {"gateway"}

Manifest = dict[str, Any]


def tool(name: str) -> str:
    """A console script of the project's environment, else one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def validate_kubernetes(*paths: Path) -> None:
    result = run(
        tool("kubernetes-validate"),
        "--strict",
        "--quiet",
        "-k",
        KUBERNETES_VERSION,
        *map(str, paths),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def base_files() -> list[Path]:
    return sorted(path for path in BASE.glob("*.yaml") if path.name != "kustomization.yaml")


def manifests() -> list[Manifest]:
    return [
        document
        for path in base_files()
        for document in yaml.safe_load_all(path.read_text())
        if document is not None
    ]


def of_kind(kind: str) -> list[Manifest]:
    return [manifest for manifest in manifests() if manifest["kind"] == kind]


def containers(manifest: Manifest) -> list[Manifest]:
    spec: list[Manifest] = manifest["spec"]["template"]["spec"]["containers"]
    return spec


def config() -> dict[str, str]:
    (config_map,) = (m for m in of_kind("ConfigMap") if m["metadata"]["name"] == "microshop-config")
    data: dict[str, str] = config_map["data"]
    return data


def compose(path: Path) -> Manifest:
    document: Manifest = yaml.safe_load(path.read_text())
    return document


def microshop_services(document: Manifest) -> Iterator[tuple[str, Manifest]]:
    """The compose services that run the microshop image (those with a command)."""
    for name, service in document["services"].items():
        if service.get("command", [None])[0] == "microshop":
            yield name, service


def test_every_manifest_passes_strict_schema_validation() -> None:
    validate_kubernetes(*base_files())


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda path: path.name)
def test_kustomize_build_passes_strict_schema_validation(directory: Path, tmp_path: Path) -> None:
    if kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(directory)]
    elif kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(directory)]
    else:
        pytest.skip("neither kustomize nor kubectl is on this machine")
    built = run(*command)
    assert built.returncode == 0, built.stderr
    output = tmp_path / "built.yaml"
    output.write_text(built.stdout)

    validate_kubernetes(output)
    kinds = {document["kind"] for document in yaml.safe_load_all(built.stdout)}
    assert {"Deployment", "StatefulSet", "Ingress", "NetworkPolicy"} <= kinds


def test_compose_files_match_the_compose_spec() -> None:
    result = run(
        tool("check-jsonschema"),
        "--builtin-schema",
        "vendor.compose-spec",
        *map(str, COMPOSE_FILES),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_file_in_the_base() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())

    assert sorted(kustomization["resources"]) == [path.name for path in base_files()]


def test_every_deployment_is_probed_limited_and_unprivileged() -> None:
    deployments = of_kind("Deployment")

    assert {d["metadata"]["name"] for d in deployments} == set(SERVICE_MODULES)
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for container in containers(deployment):
            where = f"{deployment['metadata']['name']}/{container['name']}"
            assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready", where
            assert container["livenessProbe"]["httpGet"]["path"] == "/health/live", where
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where


def test_grace_periods_cover_the_drain() -> None:
    # a service drains handlers, the relay's batch and the outbox, each up to the drain
    # time (bus.service.Service.stop); the gateway its requests, after its preStop pause
    drain = float(config()["MICROSHOP_DRAIN_SECONDS"])
    for deployment in of_kind("Deployment"):
        (container,) = containers(deployment)
        pause = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        pause_seconds = float(pause["command"][1]) if pause else 0.0
        needed = drain + pause_seconds if deployment["metadata"]["name"] == "gateway" else 3 * drain
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > needed, deployment["metadata"]["name"]


def test_every_command_runs_a_real_service_under_its_own_name() -> None:
    for deployment in of_kind("Deployment"):
        (container,) = containers(deployment)
        assert container["command"] == ["microshop", "run", deployment["metadata"]["name"]]
    for path in COMPOSE_FILES[:1]:
        named = dict(microshop_services(compose(path)))
        assert set(named) == set(SERVICE_MODULES)
        for name, service in named.items():
            assert service["command"] == ["microshop", "run", name]


def test_only_the_gateway_is_reachable_from_outside() -> None:
    backends = {
        path["backend"]["service"]["name"]
        for ingress in of_kind("Ingress")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    policies = of_kind("NetworkPolicy")
    open_to_all = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for p in policies
        if any("from" not in rule for rule in p["spec"].get("ingress", []))
    }
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {}]

    assert backends == {"gateway"}
    assert open_to_all == {"gateway"}
    assert len(default_deny) == 1
    assert "ingress" not in default_deny[0]["spec"]
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in of_kind("Service"))


def test_the_gateway_and_the_order_service_autoscale_and_every_deployment_has_a_budget() -> None:
    targets = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in of_kind("HorizontalPodAutoscaler")}
    budgets = {
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for pdb in of_kind("PodDisruptionBudget")
    }

    assert targets == {"gateway", "order"}
    assert budgets == set(SERVICE_MODULES)
    for deployment in of_kind("Deployment"):
        # the autoscaler owns the count; a replicas field would reset it on every apply
        assert ("replicas" in deployment["spec"]) == (deployment["metadata"]["name"] not in targets)


def test_the_broker_and_the_database_keep_their_data_on_volumes() -> None:
    stateful = {s["metadata"]["name"]: s for s in of_kind("StatefulSet")}

    assert set(stateful) == {"rabbitmq", "postgres"}
    for statefulset in stateful.values():
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        mounts = [m["name"] for c in containers(statefulset) for m in c["volumeMounts"]]
        assert claim["metadata"]["name"] in mounts


def test_compose_publishes_the_gateway_only_and_starts_on_health() -> None:
    services = compose(COMPOSE_FILES[0])["services"]
    published = {name for name, s in services.items() if "ports" in s and "profiles" not in s}

    assert published == {"gateway"}
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency] or dependency in SERVICE_MODULES


def test_host_networking_leaves_no_container_on_a_bridge() -> None:
    base, host = (compose(path)["services"] for path in COMPOSE_FILES)
    core = {name for name, service in base.items() if "profiles" not in service}

    assert {name for name, s in host.items() if s.get("network_mode") == "host"} == core
    for name in SERVICES | {"gateway"}:
        assert host[name]["environment"]["MICROSHOP_HOST"] == "127.0.0.1"


def test_env_example_documents_every_variable_the_compose_files_read() -> None:
    text = "\n".join(path.read_text() for path in COMPOSE_FILES)
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = (DOCKER / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, flags=re.MULTILINE))

    assert used <= documented, sorted(used - documented)
    assert "guest" not in re.findall(r"^RABBITMQ_(?:USER|PASSWORD)=(.*)$", example, re.MULTILINE)


def test_the_image_is_multi_stage_non_root_and_checks_its_own_health() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)

    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    assert stages == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert "COPY --from=build /opt/microshop /opt/microshop" in dockerfile
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", dockerfile, flags=re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK .*\n.*", dockerfile, flags=re.MULTILINE)
    assert healthcheck is not None
    assert "/opt/microshop/healthcheck.py" in healthcheck[0]
    assert "pip install --no-index --find-links /wheelhouse" in dockerfile


@pytest.fixture(scope="module")
def healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("command", "environ", "port"),
    [
        (["python3", "/opt/microshop/bin/microshop", "run", "order"], {}, 3012),
        (["microshop", "run", "gateway"], {"MICROSHOP_PORT": ""}, 3000),
        (["microshop", "run", "user", "--port", "4010"], {}, 4010),
        (["microshop", "run", "user", "--port", "4010"], {"MICROSHOP_PORT": "3110"}, 3110),
    ],
)
def test_the_image_healthcheck_asks_the_port_the_service_serves_on(
    healthcheck: Any, command: list[str], environ: dict[str, str], port: int
) -> None:
    assert healthcheck.service_port(command, environ) == port
