"""deploy/kubernetes/: the manifests against the Kubernetes schemas (kubernetes-validate, offline),
the deployment file in the ConfigMap through `kvferry config check`, and the manifests agreeing
with that file: ports, names, probes, grace periods, GPUs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvferry.daemon.server.config import load

from .conftest import DEPLOY

K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests are meant for
POD_IP = "10.0.0.7"


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _resources() -> list[dict]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _configmap() -> dict:
    """The ConfigMap the kustomization's configMapGenerator makes (before its name hash)."""
    (generator,) = _kustomization()["configMapGenerator"]
    data = {Path(f).name: (K8S / f).read_text() for f in generator["files"]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
            "data": data}  # fmt: skip


def _config(tmp_path: Path) -> Path:
    """kvferry.yaml as a pod sees it: ${POD_IP} replaced, as the containers' command does."""
    path = tmp_path / "kvferry.yaml"
    path.write_text(_configmap()["data"]["kvferry.yaml"].replace("${POD_IP}", POD_IP))
    return path


def _validate(env: dict, paths: list[Path]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION]
    return subprocess.run(
        [*command, *map(str, paths)], env=env, capture_output=True, text=True, timeout=300
    )


def test_every_manifest_is_in_the_kustomization():
    listed = set(_kustomization()["resources"])
    listed |= set(_kustomization()["configMapGenerator"][0]["files"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_manifests_pass_the_kubernetes_schemas(pypi_tools, tmp_path):
    configmap = tmp_path / "configmap.yaml"
    configmap.write_text(yaml.safe_dump(_configmap()))
    paths = [K8S / name for name in _kustomization()["resources"]] + [configmap]
    done = _validate(pypi_tools, paths)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = done.stdout.count(" passed for resource ")
    assert passed == len(_resources()) + 1, done.stdout


def test_the_schema_check_refuses_a_wrong_field(pypi_tools, tmp_path):
    """The validator really checks (a pass above is not a no-op)."""
    broken = yaml.safe_load((K8S / "decode.yaml").read_text())
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    done = _validate(pypi_tools, [path])
    assert done.returncode != 0 and "terminationGracePeriod" in done.stdout + done.stderr


def test_the_configmap_passes_config_check(tmp_path):
    command = [sys.executable, "-m", "kvferry.daemon.cli.main", "config", "check"]
    done = subprocess.run(
        [*command, str(_config(tmp_path))], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "ok (2 daemons, 1 router)" in done.stdout


def _workloads() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _resources() if d["kind"] == "Deployment"}


def _services() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _resources() if d["kind"] == "Service"}


def _entry(container: dict, deployment) -> tuple[str, object]:
    """(verb, the daemon or router) the container's command serves."""
    words = container["args"][0].split()
    verb, name = words[words.index("kvferry") + 1], words[words.index("--name") + 1]
    members = {m.name: m for m in [*deployment.daemons, *deployment.routers]}
    return verb, members[name]


@pytest.mark.parametrize("workload", ["kvferry-prefill", "kvferry-decode", "kvferry-router"])
def test_workload_agrees_with_the_config(workload, tmp_path):
    deployment = load(_config(tmp_path))
    pod = _workloads()[workload]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    verb, member = _entry(container, deployment)
    assert verb == ("router" if member.role == "router" else "serve")
    assert f"kvferry-{member.role}" == workload
    assert pod["spec"]["terminationGracePeriodSeconds"] > member.drain_timeout_s
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == member.http_port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(member.http_port)
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "http"}
    if member.role != "router":
        assert member.host == member.transfer.host == POD_IP
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert member.device == "cuda"
    if member.role == "prefill":
        assert ports["bootstrap"] == member.bootstrap_port


def test_headless_services_are_what_the_config_names(tmp_path):
    deployment = load(_config(tmp_path))
    services = _services()
    members = {m.role: m for m in [*deployment.daemons, *deployment.routers]}
    for role in ("prefill", "decode"):
        spec = services[f"kvferry-{role}"]["spec"]
        assert spec["clusterIP"] == "None"
        assert spec["selector"]["app.kubernetes.io/component"] == role
    prefill_ports = {p["name"]: p["port"] for p in services["kvferry-prefill"]["spec"]["ports"]}
    assert members["decode"].prefill == [f"tcp://kvferry-prefill:{prefill_ports['bootstrap']}"]
    assert prefill_ports["bootstrap"] == members["prefill"].bootstrap_port
    (decode_port,) = services["kvferry-decode"]["spec"]["ports"]
    assert members["router"].targets == [f"http://kvferry-decode:{decode_port['port']}"]
    assert decode_port["port"] == members["decode"].http_port
    (router_port,) = services["kvferry"]["spec"]["ports"]
    assert router_port["port"] == members["router"].http_port


def test_the_keyed_variant_passes_config_check(tmp_path):
    """docs/deploy.md's way to close the sockets: the CURVE key file and an API key from the
    Secret, no allow_insecure_bind."""
    cli = [sys.executable, "-m", "kvferry.daemon.cli.main"]
    keys = tmp_path / "keys"
    subprocess.run([*cli, "keys", "generate", str(keys)], check=True, capture_output=True)
    (keys / "api-key").write_text("a-test-key\n")
    raw = yaml.safe_load(_config(tmp_path).read_text())
    for daemon in raw["daemons"]:
        daemon["security"] = {"curve_key_file": str(keys / "kvferry.key_secret")}
    for member in [d for d in raw["daemons"] if d["role"] == "decode"] + raw["routers"]:
        member["api_key_file"] = str(keys / "api-key")
    path = tmp_path / "keyed.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [*cli, "config", "check", str(path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    for name, workload in _workloads().items():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert "/etc/kvferry-keys" in {m["mountPath"] for m in container["volumeMounts"]}, name
