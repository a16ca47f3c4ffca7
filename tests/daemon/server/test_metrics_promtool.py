"""A clean `promtool check metrics` on a rendered registry and on scrapes of a real deployment;
promtool comes from PATH or from Debian's `prometheus` package."""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support.cluster import client, decode, generate, prefill, running, wait_for, write
from support.metrics_sim import documented, exported, samples


@pytest.fixture(scope="session")
def promtool(pytestconfig) -> str:
    """promtool from PATH, else from Debian's `prometheus` package, fetched once into the pytest
    cache (only the .deb is downloaded and unpacked; nothing is installed)."""
    found = shutil.which("promtool")
    if found:
        return found
    cached = pytestconfig.cache.mkdir("promtool") / "promtool"
    if not _runs(cached):
        _fetch_promtool(cached)
    assert _runs(cached), f"{cached} does not run"
    return str(cached)


def _runs(path: Path) -> bool:
    if not path.is_file():
        return False
    return subprocess.run([path, "--version"], capture_output=True, timeout=30).returncode == 0


def _fetch_promtool(dest: Path) -> None:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("promtool is not on PATH, and there is no apt-get/dpkg-deb to fetch it")
    work = dest.parent / "download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    deb = _apt_download(work)
    _check_sha256(deb)
    unpack = 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" ./usr/bin/promtool'
    subprocess.run(["sh", "-c", unpack, "sh", deb, work], check=True, timeout=120)
    os.replace(work / "usr" / "bin" / "promtool", dest)
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
    pytest.skip(f"promtool: `apt-get download prometheus` failed: {got.stderr.strip()[-400:]}")


def _check_sha256(deb: Path) -> None:
    """The .deb's sha256 must be one the package index lists (apt verifies it as well)."""
    index = subprocess.run(["apt-cache", "show", "prometheus"], capture_output=True, text=True)
    listed = set(re.findall(r"^SHA256: (\w+)$", index.stdout, re.M))
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    assert digest in listed, f"{deb.name}: sha256 {digest} is not in the package index"


def promtool_check(promtool: str, text: str) -> None:
    """`promtool check metrics` accepts `text` without a single lint message."""
    run = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    said = (run.stdout + run.stderr).strip()
    assert run.returncode == 0 and not said, f"promtool (exit {run.returncode}):\n{said}"


def test_promtool_accepts_the_rendered_registry(rendered, promtool):
    promtool_check(promtool, rendered[0])


def test_promtool_accepts_scrapes_of_a_deployment(tmp_path, promtool):
    """prefill TP2 -> decode TP1 with the random model; one request, then both daemons scraped
    once their snapshots show its KV: sent by prefill's ranks = received by decode's."""
    p = prefill("prefill-0", tp=2)
    path = write(tmp_path, [p, decode("decode-0", [p])])
    with running(path) as launcher:
        generate(launcher, "decode-0", list(range(1, 30)))
        scrapes = {}

        def settled() -> bool:
            scrapes.update({n: client(launcher, n).metrics() for n in ("prefill-0", "decode-0")})
            sent = _sum(scrapes["prefill-0"], "kvferry_kv_bytes_sent_total")
            return sent > 0 and sent == _sum(scrapes["decode-0"], "kvferry_kv_bytes_received_total")

        wait_for(settled, "snapshots that show the request's KV", 10)
    docs = documented()
    for name, text in scrapes.items():
        promtool_check(promtool, text)
        families = exported(text)
        assert {n: kind for n, (kind, _) in families.items()} == {
            n: kind for n, (kind, _) in docs.items()
        }, name
        for family, (_, labels) in families.items():
            assert not labels or labels == docs[family][1], (name, family)
        assert _sum(text, "kvferry_requests_total") == 1, name


def _sum(text: str, name: str) -> float:
    return sum(v for (n, _), v in samples(text).items() if n == name)
