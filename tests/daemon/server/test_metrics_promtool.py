"""A clean `promtool check metrics` on a rendered registry and on scrapes of a real deployment;
promtool comes from PATH or from Debian's `prometheus` package."""

import subprocess

import pytest

from support.cluster import client, decode, generate, prefill, running, wait_for, write
from support.metrics_sim import documented, exported, samples
from support.prometheus_deb import prometheus_binaries


@pytest.fixture(scope="session")
def promtool(pytestconfig) -> str:
    """promtool from PATH, else from Debian's `prometheus` package, fetched once into the pytest
    cache (only the .deb is downloaded and unpacked; nothing is installed)."""
    return prometheus_binaries(pytestconfig, ("promtool",))["promtool"]


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
    once their snapshots show its KV: sent by prefill's ranks = received by decode's, every
    rank over the native data path (ucx_native.c, built at the ranks' start)."""
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
        native = [v for (n, _), v in samples(text).items() if n == "kvferry_native_data_path"]
        assert native and set(native) == {1.0}, (name, native)


def _sum(text: str, name: str) -> float:
    return sum(v for (n, _), v in samples(text).items() if n == name)
