"""What a daemon exports on /metrics: every family docs/metrics.md lists (name, type, labels) and
no other, the values of the rank snapshots and observations, and a clean `promtool check metrics`
on a rendered registry and on scrapes of a real deployment."""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from cluster import client, decode, generate, prefill, running, wait_for, write
from kvferry.daemon.metrics import Metrics, failure_category
from kvferry.daemon.protocol import Snapshot
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.control import request
from kvferry.transport.messages import Codec, ErrorReply, RankInfo, RegisterRank, SubmitPrompt
from kvferry.transport.room import KVPoll
from transfer_sim import layout_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_ROW = re.compile(r"^\| `(kvferry_\w+)` \| (\w+) \| ([^|]*) \| (?:prefill|decode|both) \|", re.M)

# exported name -> Snapshot field, for the per-rank families (label `rank` only)
PER_RANK = {
    "kvferry_kv_bytes_sent_total": "bytes_sent",
    "kvferry_kv_bytes_received_total": "bytes_received",
    "kvferry_ucx_messages_sent_total": "messages_sent",
    "kvferry_ucx_messages_received_total": "messages_received",
    "kvferry_ring_waits_total": "ring_waits",
    "kvferry_ring_wait_seconds_total": "ring_wait_s",
    "kvferry_bad_frames_total": "bad_frames",
    "kvferry_ring_used_bytes": "ring_used",
    "kvferry_ring_capacity_bytes": "ring_capacity",
    "kvferry_ring_high_water_bytes": "ring_high_water",
    "kvferry_kv_pages_used": "kv_pages_used",
    "kvferry_kv_pages_capacity": "kv_pages_total",
    "kvferry_transfer_rooms_total": "rooms_succeeded",
    "kvferry_transfer_cpu_seconds_total": "transfer_cpu_s",
    "kvferry_engine_cpu_seconds_total": "engine_cpu_s",
    "kvferry_kv_pool_bytes": "kv_pool_bytes",
    "kvferry_device_memory_peak_bytes": "memory_peak",
}


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """The metric tables of docs/metrics.md: exported name -> (type, label names)."""
    text = DOC.read_text()
    rows = _ROW.findall(text)
    assert len(rows) == len(re.findall(r"^\| `kvferry_", text, re.M)), "a malformed table row"
    table = {}
    for name, kind, labels in rows:
        assert name not in table, f"{name} is documented twice"
        table[name] = (kind, frozenset(re.findall(r"`(\w+)`", labels)))
    return table


def exported(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """A scrape's families: exported name (counters with their _total) -> (type, label names)."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        families[name] = (family.type, frozenset(labels))
    return families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, label items) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def snapshot(rank: int, **fields) -> Snapshot:
    values = dict.fromkeys(
        ("ring_used", "ring_capacity", "ring_high_water", "kv_pages_used", "kv_pages_total"), 0
    )
    values |= dict.fromkeys(("bytes_sent", "bytes_received", "messages_sent"), 0)
    values |= dict.fromkeys(("messages_received", "ring_waits", "ring_wait_s", "bad_frames"), 0)
    values |= {"rooms": {s.name: 0 for s in KVPoll}, "queues": {}, "failures": {}, "peers": []}
    values |= {"forward_s": [], "transfer_s": []}
    values |= dict.fromkeys(("rooms_succeeded", "transfer_cpu_s", "engine_cpu_s"), 0)
    values |= dict.fromkeys(("kv_pool_bytes", "memory_peak"), 0)
    return Snapshot(rank=rank, **(values | fields))


def decode_snapshots() -> list[Snapshot]:
    queues = {"waiting": 1, "arriving": 2, "running": 3}
    return [
        snapshot(
            0,
            bytes_received=1 << 20,
            messages_received=8,
            ring_waits=3,
            ring_wait_s=0.25,
            ring_used=4096,
            ring_capacity=1 << 24,
            ring_high_water=8192,
            kv_pages_used=10,
            kv_pages_total=512,
            queues=queues,
            failures={"timeout": 2},
            rooms_succeeded=5,
            transfer_cpu_s=0.125,
            engine_cpu_s=2.5,
            kv_pool_bytes=1 << 30,
            memory_peak=3 << 30,
            rooms={**snapshot(0).rooms, "Transferring": 2},
            forward_s=[0.01, 0.02],
            transfer_s=[0.3],
        ),
        snapshot(
            1,
            bytes_received=1 << 19,
            messages_received=4,
            bad_frames=1,
            ring_capacity=1 << 24,
            kv_pages_used=7,
            kv_pages_total=512,
            queues=queues,
            failures={"peer lost": 1, "ring full": 4},
            rooms={**snapshot(1).rooms, "Failed": 1},
            forward_s=[0.015],
        ),
    ]


@pytest.fixture
def rendered() -> tuple[str, list[Snapshot]]:
    """A decode daemon's registry after two ranks' snapshots and a few finished requests."""
    metrics = Metrics("decode", "d0")
    stale = snapshot(0, bytes_received=1, kv_pages_used=500, forward_s=[0.5])
    for s in [stale, *decode_snapshots()]:
        metrics.take(s)  # a rank's later snapshot replaces its earlier one
    metrics.ttft.observe(0.2)
    metrics.itl.observe(0.004)
    metrics.latency.observe(1.5)
    metrics.transfer.observe(0.1)
    metrics.in_flight.inc(3)
    metrics.prefill_reachable.labels("tcp://127.0.0.1:17100").set(1)
    metrics.finished("ok")
    metrics.finished("ok")
    metrics.finished("error", "prefill tcp://127.0.0.1:17100 refused the prompt: not serving")
    metrics.finished("error", "transfer failed: ring full: no staging room for 30s")
    return metrics.render().decode(), decode_snapshots()


def test_every_documented_family_is_exported_and_no_other(rendered):
    text, _ = rendered
    assert exported(text) == documented()
    names = set(re.findall(r"\bkvferry_\w+", DOC.read_text()))  # tables, prose and queries
    sample_names = {name for name, _ in samples(text)}
    assert names <= sample_names | set(exported(text)), "docs name what is not exported"
    assert not [n for n in sample_names if n.endswith("_created")]


def test_per_rank_values_are_the_latest_snapshot_of_each_rank(rendered):
    text, snapshots = rendered
    got = samples(text)
    for name, field in PER_RANK.items():
        for s in snapshots:
            assert got[name, frozenset({("rank", str(s.rank))})] == getattr(s, field), name
    labelled = {
        "kvferry_transfer_failures_total": ("reason", "failures"),
        "kvferry_rooms": ("state", "rooms"),
        "kvferry_queue_depth": ("queue", "queues"),
    }
    for name, (label, field) in labelled.items():
        for s in snapshots:
            for key, count in getattr(s, field).items():
                assert got[name, frozenset({("rank", str(s.rank)), (label, key)})] == count
    rooms = [n for (n, labels) in got if n == "kvferry_rooms"]
    assert len(rooms) == 2 * len(KVPoll)  # every state of every rank, zeros included


def test_request_metrics_and_histograms(rendered):
    got = samples(rendered[0])
    none = frozenset()
    assert got["kvferry_info", frozenset({("role", "decode"), ("name", "d0")})] == 1
    assert got["kvferry_requests_in_flight", none] == 3
    assert got["kvferry_requests_total", frozenset({("outcome", "ok")})] == 2
    assert got["kvferry_requests_total", frozenset({("outcome", "error")})] == 2
    for reason in ("prefill tcp://127.0.0.1:17100 refused the prompt", "transfer failed"):
        assert got["kvferry_request_failures_total", frozenset({("reason", reason)})] == 1
    # histogram samples of every snapshot accumulate, the replaced one's included
    counts = {"forward": 4, "transfer": 2, "ttft": 1, "inter_token": 1, "request": 1}
    for name, count in counts.items():
        assert got[f"kvferry_{name}_seconds_count", none] == count, name
        assert got[f"kvferry_{name}_seconds_bucket", frozenset({("le", "+Inf")})] == count
    assert got["kvferry_forward_seconds_sum", none] == pytest.approx(0.545)


BOOTSTRAP = (
    "kvferry_bootstrap_bad_frames_total",
    "kvferry_bootstrap_refused_registrations_total",
    "kvferry_bootstrap_dropped_replies_total",
    "kvferry_bootstrap_failed_frames_total",
)


def test_bootstrap_counters_are_exported_at_scrape_time(rendered):
    """Decode has no bootstrap server: its counters stay at 0. A prefill daemon's show what its
    server refused, read at each scrape."""
    assert all(samples(rendered[0])[name, frozenset()] == 0 for name in BOOTSTRAP)

    def broken_intake(message, peer):
        raise RuntimeError("intake bug")

    server = BootstrapServer(1, on_submit=broken_intake)
    context, codec = zmq.Context(), Codec(1 << 20)
    try:
        metrics = Metrics("prefill", "p0")
        metrics.count_bootstrap(server.counters)
        rank = RankInfo(layout_for(4, 1, 0), b"ucx", "tcp://127.0.0.1:1000")
        for message in (RegisterRank(rank, b"guess"), SubmitPrompt(7, [1, 2])):
            assert isinstance(request(context, codec, server.address, message, 5), ErrorReply)
        before = samples(metrics.render().decode())
        socket = context.socket(zmq.DEALER)
        socket.connect(server.address)
        socket.send(b"not a frame")
        assert socket.poll(5000)  # answered: counted
        socket.close(linger=0)
        after = samples(metrics.render().decode())
    finally:
        server.close()
        context.term()
    # in BOOTSTRAP's order: bad frames, refused registrations, dropped replies, failed frames
    assert [before[name, frozenset()] for name in BOOTSTRAP] == [0, 1, 0, 1]
    assert [after[name, frozenset()] for name in BOOTSTRAP] == [1, 1, 0, 1]


@pytest.mark.parametrize(
    "reason, category",
    [
        ("timeout: request unfinished after 600s", "timeout"),
        ("transfer failed: ring full: no staging room for 30s", "transfer failed"),
        (
            "prefill tcp://10.0.0.1:17100 refused the prompt: x",
            "prefill tcp://10.0.0.1:17100 refused the prompt",
        ),
        ("rank 1 exited with code -9", "rank 1 exited with code -9"),
        ("x" * 100, "x" * 60),
        (" : y", "unknown"),
    ],
)
def test_failure_reasons_become_bounded_categories(reason, category):
    assert failure_category(reason) == category


# --- promtool ------------------------------------------------------------------------------------


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
