"""Tools the deployment-file tests run, fetched once into the pytest cache: Prometheus and
promtool from Debian's `prometheus` package (only the .deb is downloaded and unpacked, as
tests/daemon/server/test_metrics_promtool.py does for promtool), and the PyPI packages that
check manifests offline (kubernetes-validate ships the Kubernetes schemas) installed with pip
into a folder of their own, run in subprocesses so they never mix with the test environment."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# pinned: the schemas and the parser the checks were written against
PYPI_TOOLS = ("kubernetes-validate==1.37.0", "dockerfile-parse==2.0.1")


@pytest.fixture(scope="session")
def prometheus_bin(pytestconfig) -> dict[str, str]:
    """{"prometheus": path, "promtool": path}: from PATH when both are there, else unpacked
    from Debian's `prometheus` package into the pytest cache."""
    found = {name: shutil.which(name) for name in ("prometheus", "promtool")}
    if all(found.values()):
        return found
    folder = pytestconfig.cache.mkdir("prometheus-deb")
    paths = {name: folder / name for name in found}
    if not all(_runs(path) for path in paths.values()):
        _unpack_deb(folder)
    for path in paths.values():
        assert _runs(path), f"{path} does not run"
    return {name: str(path) for name, path in paths.items()}


def _runs(path: Path) -> bool:
    if not path.is_file():
        return False
    return subprocess.run([path, "--version"], capture_output=True, timeout=30).returncode == 0


def _unpack_deb(folder: Path) -> None:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("prometheus is not on PATH, and there is no apt-get/dpkg-deb to fetch it")
    work = folder / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    deb = _apt_download(work)
    _check_sha256(deb)
    unpack = 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" ./usr/bin/prometheus ./usr/bin/promtool'
    subprocess.run(["sh", "-c", unpack, "sh", deb, work], check=True, timeout=120)
    for name in ("prometheus", "promtool"):
        os.replace(work / "usr" / "bin" / name, folder / name)
    shutil.rmtree(work)


def _apt_download(work: Path) -> Path:
    """The `prometheus` .deb in `work`; with empty or stale package lists (a fresh machine),
    `apt-get update` first (as root)."""
    for attempt in range(2):
        if attempt and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300)
        got = subprocess.run(
            ["apt-get", "download", "-q", "prometheus"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        debs = sorted(work.glob("prometheus_*.deb"))
        if got.returncode == 0 and debs:
            return debs[0]
    pytest.skip(f"prometheus: `apt-get download prometheus` failed: {got.stderr.strip()[-400:]}")


def _check_sha256(deb: Path) -> None:
    """The .deb's sha256 must be one the package index lists (apt verifies it as well)."""
    index = subprocess.run(["apt-cache", "show", "prometheus"], capture_output=True, text=True)
    listed = set(re.findall(r"^SHA256: (\w+)$", index.stdout, re.M))
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    assert digest in listed, f"{deb.name}: sha256 {digest} is not in the package index"


@pytest.fixture(scope="session")
def pypi_tools(pytestconfig) -> dict[str, str]:
    """The environment that runs the PyPI tools: `python -m kubernetes_validate`, and
    dockerfile_parse importable, from a folder of their own in the pytest cache."""
    folder = pytestconfig.cache.mkdir("deploy-tools")
    stamp = folder / "installed.txt"
    if not stamp.is_file() or stamp.read_text() != "\n".join(PYPI_TOOLS):
        shutil.rmtree(folder / "site", ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(folder / "site")]
        got = subprocess.run([*pip, *PYPI_TOOLS], capture_output=True, text=True, timeout=600)
        if got.returncode:
            pytest.skip(f"pip could not install {PYPI_TOOLS}: {got.stderr.strip()[-400:]}")
        stamp.write_text("\n".join(PYPI_TOOLS))
    return {**os.environ, "PYTHONPATH": str(folder / "site"), "PYTHONNOUSERSITE": "1"}
