"""Tools the deployment-file tests run, fetched once into the pytest cache: Prometheus and
promtool from Debian's `prometheus` package (only the .deb is downloaded and unpacked, as
tests/daemon/server/test_metrics_promtool.py does for promtool), and the PyPI packages that
check manifests offline (kubernetes-validate ships the Kubernetes schemas) installed with pip
into a folder of their own, run in subprocesses so they never mix with the test environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.prometheus_deb import prometheus_binaries

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# pinned: the schemas and the parser the checks were written against
PYPI_TOOLS = ("kubernetes-validate==1.37.0", "dockerfile-parse==2.0.1")


@pytest.fixture(scope="session")
def prometheus_bin(pytestconfig) -> dict[str, str]:
    """{"prometheus": path, "promtool": path}: from PATH when both are there, else unpacked
    from Debian's `prometheus` package into the pytest cache."""
    return prometheus_binaries(pytestconfig, ("prometheus", "promtool"))


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
