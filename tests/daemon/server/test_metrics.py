"""What a daemon exports on /metrics: every family docs/metrics.md lists (name, type, labels) and
no other, and the values of the rank snapshots and observations; `promtool check metrics` is in
test_metrics_promtool.py."""

import re

import pytest
import zmq

from kvferry.daemon.server.metrics import Metrics
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.control import request
from kvferry.transport.messages import Codec, ErrorReply, RankInfo, RegisterRank, SubmitPrompt
from kvferry.transport.room import KVPoll
from support.metrics_sim import DOC, documented, exported, samples
from support.transfer_sim import layout_for

# exported name -> Snapshot field, for the per-rank families (label `rank` only)
PER_RANK = {
    "kvferry_kv_bytes_sent_total": "bytes_sent",
    "kvferry_kv_bytes_received_total": "bytes_received",
    "kvferry_ucx_messages_sent_total": "messages_sent",
    "kvferry_ucx_messages_received_total": "messages_received",
    "kvferry_ring_waits_total": "ring_waits",
    "kvferry_receives_posted_ahead_total": "receives_ahead",
    "kvferry_ring_wait_seconds_total": "ring_wait_s",
    "kvferry_bad_frames_total": "bad_frames",
    "kvferry_ring_used_bytes": "ring_used",
    "kvferry_ring_capacity_bytes": "ring_capacity",
    "kvferry_native_data_path": "native_data_path",
    "kvferry_ring_high_water_bytes": "ring_high_water",
    "kvferry_kv_pages_used": "kv_pages_used",
    "kvferry_kv_pages_capacity": "kv_pages_total",
    "kvferry_transfer_rooms_total": "rooms_succeeded",
    "kvferry_transfer_cpu_seconds_total": "transfer_cpu_s",
    "kvferry_engine_cpu_seconds_total": "engine_cpu_s",
    "kvferry_graph_forwards_total": "graph_forwards",
    "kvferry_transfer_loop_turns_total": "loop_turns",
    "kvferry_transfer_loop_timer_turns_total": "loop_timer_turns",
    "kvferry_transfer_loop_quiet_turns_total": "loop_quiet_turns",
    "kvferry_transfer_loop_sleep_events_total": "loop_sleep_events",
    "kvferry_kv_pool_bytes": "kv_pool_bytes",
    "kvferry_device_memory_peak_bytes": "memory_peak",
}


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
        "kvferry_transfer_failures_total": ("kind", "failures"),
        "kvferry_rooms": ("state", "rooms"),
        "kvferry_queue_depth": ("queue", "queues"),
        "kvferry_transfer_loop_wakes_total": ("cause", "loop_wakes"),
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
    for kind in ("refused", "ring_full"):  # bounded labels: the failure's kind, not its text
        assert got["kvferry_request_failures_total", frozenset({("kind", kind)})] == 1
    failures = {labels for name, labels in got if name == "kvferry_request_failures_total"}
    assert failures == {frozenset({("kind", "refused")}), frozenset({("kind", "ring_full")})}
    # histogram samples of every snapshot accumulate, the replaced one's included
    counts = {"forward": 4, "transfer": 2, "ttft": 1, "inter_token": 1, "request": 1}
    for name, count in counts.items():
        assert got[f"kvferry_{name}_seconds_count", none] == count, name
        assert got[f"kvferry_{name}_seconds_bucket", frozenset({("le", "+Inf")})] == count
    assert got["kvferry_forward_seconds_sum", none] == pytest.approx(0.545)
    # the garbage collector's passes, by process and generation (rank 0's snapshot has three)
    full, young = ({("process", "rank0"), ("generation", g)} for g in "20")
    assert got["kvferry_gc_pause_seconds_count", frozenset(full)] == 1
    assert got["kvferry_gc_pause_seconds_sum", frozenset(full)] == pytest.approx(0.03)
    assert got["kvferry_gc_pause_seconds_count", frozenset(young)] == 2


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
