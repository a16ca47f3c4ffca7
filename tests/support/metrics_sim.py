"""Helpers of the metrics tests: the metric tables of docs/metrics.md, the families and samples of
a scrape, and rank snapshots to feed a registry."""

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvferry.daemon.server.protocol import Snapshot
from kvferry.transport.room import KVPoll

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_ROW = re.compile(
    r"^\| `((?:kvferry|process)_\w+)` \| (\w+) \| ([^|]*) \| (?:prefill|decode|both) \|", re.M
)


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """The metric tables of docs/metrics.md (kvferry's and the process's): exported name ->
    (type, label names)."""
    text = DOC.read_text()
    rows = _ROW.findall(text)
    assert len(rows) == len(re.findall(r"^\| `(?:kvferry|process)_", text, re.M)), "a bad row"
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
            graph_forwards=9,
            loop_turns=40,
            loop_timer_turns=7,
            loop_quiet_turns=3,
            loop_sleep_events=11,
            loop_wakes={"bell": 12, "data": 20, "control": 5, "timer": 7, "at_once": 2},
            kv_pool_bytes=1 << 30,
            memory_peak=3 << 30,
            native_data_path=1,  # rank 1: 0, through ucxx
            rooms={**snapshot(0).rooms, "Transferring": 2},
            forward_s=[0.01, 0.02],
            transfer_s=[0.3],
            gc_pauses=[(2, 0.03), (0, 0.0002), (0, 0.0004)],
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
            failures={"peer_lost": 1, "ring_full": 4},
            rooms={**snapshot(1).rooms, "Failed": 1},
            forward_s=[0.015],
        ),
    ]
