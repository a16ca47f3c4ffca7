"""Prometheus' binaries for tests: from PATH, else unpacked from Debian's `prometheus` package
into the pytest cache (only the .deb is downloaded, its sha256 checked against the package
index; nothing is installed)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def prometheus_binaries(pytestconfig, names: tuple[str, ...]) -> dict[str, str]:
    """{name: path} of each of `names` ("prometheus", "promtool"), fetched once per cache."""
    found = {name: shutil.which(name) for name in names}
    if all(found.values()):
        return found
    folder = pytestconfig.cache.mkdir("prometheus-deb")
    paths = {name: folder / name for name in names}
    if not all(_runs(path) for path in paths.values()):
        _unpack_deb(folder, names)
    for path in paths.values():
        assert _runs(path), f"{path} does not run"
    return {name: str(path) for name, path in paths.items()}


def _runs(path: Path) -> bool:
    if not path.is_file():
        return False
    return subprocess.run([path, "--version"], capture_output=True, timeout=30).returncode == 0


def _unpack_deb(folder: Path, names: tuple[str, ...]) -> None:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip(f"{' and '.join(names)} not on PATH, and no apt-get/dpkg-deb to fetch them")
    work = folder / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    deb = _apt_download(work)
    _check_sha256(deb)
    members = " ".join(f"./usr/bin/{name}" for name in names)
    unpack = f'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" {members}'
    subprocess.run(["sh", "-c", unpack, "sh", deb, work], check=True, timeout=120)
    for name in names:
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
    pytest.skip(f"`apt-get download prometheus` failed: {got.stderr.strip()[-400:]}")


def _check_sha256(deb: Path) -> None:
    """The .deb's sha256 must be one the package index lists (apt verifies it as well)."""
    index = subprocess.run(["apt-cache", "show", "prometheus"], capture_output=True, text=True)
    listed = set(re.findall(r"^SHA256: (\w+)$", index.stdout, re.M))
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    assert digest in listed, f"{deb.name}: sha256 {digest} is not in the package index"
