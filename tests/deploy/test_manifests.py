"""The Kubernetes manifests and the image: schema-valid, and consistent with the server's flags."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "base"
GPU_OVERLAY = ROOT / "deploy" / "overlays" / "gpu"
KUBERNETES_VERSION = "1.33"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _base_resources() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    resources: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in _documents(BASE / name):
            resources[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return resources


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("key", sorted(_base_resources()))
def test_base_manifest_is_schema_valid(key: str) -> None:
    kubernetes_validate.validate(_base_resources()[key], KUBERNETES_VERSION, strict=True)


def _render_gpu_deployment() -> dict[str, Any]:
    deployment = copy.deepcopy(_base_resources()["Deployment/protoserve"])
    patch = yaml.safe_load((GPU_OVERLAY / "gpu-patch.yaml").read_text())
    return jsonpatch.apply_patch(deployment, patch)


def test_gpu_overlay_renders_to_a_valid_deployment() -> None:
    deployment = _render_gpu_deployment()
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    server = _container(deployment, "server")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"].endswith(":cuda")


def test_probes_match_the_configured_ports_and_health_service() -> None:
    resources = _base_resources()
    config = resources["ConfigMap/protoserve-config"]["data"]
    deployment = resources["Deployment/protoserve"]
    server = _container(deployment, "server")
    grpc_port = int(config["PROTOSERVE_GRPC_PORT"])
    assert {p["containerPort"] for p in server["ports"]} == {grpc_port, int(config["PROTOSERVE_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == grpc_port, probe
    # A draining server is NOT_SERVING; liveness must not restart it before the drain grace ends.
    drain = int(config["PROTOSERVE_DRAIN_GRACE"])
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain
    translator = _container(deployment, "translator")
    http_port = int(config["PROTOSERVE_HTTP_PORT"])
    assert translator["readinessProbe"]["httpGet"] == {"path": "/health", "port": http_port}
    assert translator["ports"][0]["containerPort"] == http_port
    # Model loading can take minutes: the startup probe allows ten.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_termination_grace_exceeds_pre_stop_and_drain_grace() -> None:
    resources = _base_resources()
    drain = int(resources["ConfigMap/protoserve-config"]["data"]["PROTOSERVE_DRAIN_GRACE"])
    deployment = resources["Deployment/protoserve"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    for name in ("server", "translator"):
        # Both wait out endpoint removal before SIGTERM; the wait counts against the grace period.
        command = _container(deployment, name)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", name
        assert grace >= int(command[1]) + drain + 5, name


def test_sidecar_shares_the_unix_socket_volume() -> None:
    resources = _base_resources()
    socket = Path(resources["ConfigMap/protoserve-config"]["data"]["PROTOSERVE_UNIX_SOCKET"])
    deployment = resources["Deployment/protoserve"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for name in ("server", "translator"):
        mounts = {m["mountPath"]: m["name"] for m in _container(deployment, name)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[str(socket.parent)]], name


def test_grpc_service_is_headless_for_client_side_balancing() -> None:
    service = _base_resources()["Service/protoserve-grpc"]
    assert service["spec"]["clusterIP"] == "None"


def test_hpa_scales_on_a_metric_the_server_exports() -> None:
    hpa = _base_resources()["HorizontalPodAutoscaler/protoserve"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    metrics_source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("metrics*.py"))
    assert f'"{metric}"' in metrics_source or f"'{metric}'" in metrics_source, metric


def test_pods_run_as_non_root() -> None:
    spec = _base_resources()["Deployment/protoserve"]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert "USER 10001" in (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_never_copies_weights() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" or "*" in ignore, "the .dockerignore must start from nothing"
    for line in ignore:
        assert not line.startswith("!") or not line.rstrip("/").endswith(("models", ".venv", "cache")), line


def _pod_claims(deployment: dict[str, Any]) -> dict[str, str]:
    """Volume name -> claim name, for the pod's PersistentVolumeClaim volumes."""
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    return {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_every_replica_can_mount_the_claims_on_any_node(overlay: str) -> None:
    """Replicas (and the HPA's) land on several nodes: a ReadWriteOnce claim attaches to one node only.
    A claim mounted writable must be ReadWriteMany; ReadOnlyMany would do for read-only mounts."""
    resources = _base_resources()
    deployment = resources["Deployment/protoserve"] if overlay == "base" else _render_gpu_deployment()
    hpa = resources["HorizontalPodAutoscaler/protoserve"]["spec"]
    assert max(deployment["spec"]["replicas"], hpa["maxReplicas"]) > 1
    claims = _pod_claims(deployment)
    assert claims, "the pod mounts the models claim"
    for volume, claim in claims.items():
        modes = set(resources[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"])
        assert "ReadWriteOnce" not in modes and "ReadWriteOncePod" not in modes, claim
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] == volume:
                    allowed = {"ReadWriteMany", "ReadOnlyMany"} if mount.get("readOnly") else {"ReadWriteMany"}
                    assert modes & allowed, (container["name"], claim, modes)


def test_only_the_server_mounts_the_models_and_can_write_its_caches_there() -> None:
    """The entrypoint fetches the demo models into PROTOSERVE_CACHE_DIR in the server role only; that
    folder must be on the server's writable models mount (the root filesystem is read-only)."""
    deployment = _base_resources()["Deployment/protoserve"]
    models_volume = next(name for name, claim in _pod_claims(deployment).items() if claim == "protoserve-models")
    (mount,) = [m for m in _container(deployment, "server")["volumeMounts"] if m["name"] == models_volume]
    assert not mount.get("readOnly", False)
    dockerfile = (ROOT / "Dockerfile").read_text()
    for variable in ("PROTOSERVE_CACHE_DIR", "PROTOSERVE_KERNEL_CACHE_DIR", "HF_HOME"):
        match = re.search(rf"{variable}=(\S+)", dockerfile)
        assert match is not None, variable
        assert Path(match.group(1)).is_relative_to(mount["mountPath"]), variable
    translator_mounts = {m["name"] for m in _container(deployment, "translator")["volumeMounts"]}
    assert models_volume not in translator_mounts
