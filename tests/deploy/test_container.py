"""deploy/container/Dockerfile, checked offline: it parses (dockerfile-parse), every COPY source
is a file of the repository that the build context lets in, the image installs the CUDA 13
flavour, runs as a non-root user, has a HEALTHCHECK, and its entry point is a kvferry command."""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
import sys

import pytest

from kvferry.daemon.cli.main import main

from .conftest import DEPLOY, ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

DOCKERFILE = DEPLOY / "container" / "Dockerfile"
IGNORE = DOCKERFILE.with_name("Dockerfile.dockerignore")
PARSE = """
import json, sys
from dockerfile_parse import DockerfileParser
parser = DockerfileParser(path=sys.argv[1])
print(json.dumps({"structure": parser.structure, "baseimage": parser.baseimage,
                  "args": parser.args}))
"""


@pytest.fixture(scope="module")
def parsed(pypi_tools) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PARSE, str(DOCKERFILE)],
        env=pypi_tools,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _instructions(parsed: dict, name: str) -> list[str]:
    return [i["value"] for i in parsed["structure"] if i["instruction"] == name]


def _copy_sources(parsed: dict) -> list[str]:
    sources = []
    for value in _instructions(parsed, "COPY"):
        words = [w for w in shlex.split(value) if not w.startswith("--")]
        sources += words[:-1]
    return sources


def test_every_copy_source_exists_and_is_in_the_context(parsed):
    sources = _copy_sources(parsed)
    assert "pyproject.toml" in sources
    patterns = [line for line in IGNORE.read_text().splitlines() if line and line[0] != "#"]
    for source in sources:
        matches = sorted(ROOT.glob(source))
        assert matches, f"COPY {source}: no such file in the repository"
        for match in matches:
            relative = match.relative_to(ROOT).as_posix()
            # the last matching pattern wins, as in .dockerignore
            kept = True
            for pattern in patterns:
                if fnmatch.fnmatch(relative, pattern.lstrip("!").rstrip("/")):
                    kept = pattern.startswith("!")
            assert kept, f"COPY {source}: {relative} is left out of the build context"


def test_every_package_folder_is_copied(parsed):
    """pip installs the project from what was copied: each package folder must be there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    sources = {s.split("/")[0] for s in _copy_sources(parsed)}
    assert folders <= sources


def test_the_image_is_the_cuda13_flavour(parsed):
    base = parsed["args"].get("CUDA_IMAGE") or parsed["baseimage"]
    assert base.startswith("nvidia/cuda:13.") and "runtime" in base
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cu13 = " ".join(extras["optional-dependencies"]["cu13"])
    assert "cupy-cuda13x" in cu13 and "ucxx-cu13" in cu13
    assert any('".[cu13]"' in run for run in _instructions(parsed, "RUN"))


def test_the_image_runs_as_a_user_with_a_healthcheck(parsed):
    (user,) = _instructions(parsed, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: Kubernetes' runAsNonRoot can check it
    (health,) = _instructions(parsed, "HEALTHCHECK")
    assert "KVFERRY_HEALTH_URL" in health and "CMD" in health
    assert _instructions(parsed, "STOPSIGNAL") == ["SIGTERM"]


def test_the_entrypoint_is_a_kvferry_command(parsed):
    (entrypoint,) = _instructions(parsed, "ENTRYPOINT")
    (command,) = _instructions(parsed, "CMD")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(entrypoint) == ["kvferry"] and "kvferry" in scripts
    verb, *options = json.loads(command)
    assert verb in main.commands
    assert options == ["--config", "/etc/kvferry/kvferry.yaml"]


def test_the_image_can_build_the_native_data_path(parsed):
    """transport/ucx_native.c and staging/host_copy.c are compiled with the image's gcc: at
    build time into the cache, again at the first start where a volume hides the cache."""
    runs = _instructions(parsed, "RUN")
    assert any("gcc" in run.split() and "libc6-dev" in run.split() for run in runs)
    assert any("native_lib.build()" in run and "host_copy.library()" in run for run in runs)
    users = [i["instruction"] for i in parsed["structure"]]
    build = next(
        i for i, entry in enumerate(parsed["structure"]) if "native_lib.build()" in entry["value"]
    )
    assert "USER" in users[:build]  # built as the user whose cache it is
