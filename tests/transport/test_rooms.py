"""Room life cycles over the loopback data plane: modes, concurrency, failures, aborts."""

import time

import pytest

from kvferry.transport.failure import FailureKind, aborted
from kvferry.transport.room import KVPoll
from support.transfer_sim import (
    Request,
    decode_matches,
    prefill_fill,
    req_slots,
    settle,
    small_config,
    start_receivers,
    start_senders,
    wait_all,
    wait_for,
    wait_idle,
)


def reasons(handles):
    return [str(h.failure) for h in handles]


def test_mla_latent_goes_to_every_decode_rank(deployments):
    dep = deployments(1, 2, 3, mla=True, head_dim=32, d_page_size=1)
    req, senders, receivers = dep.run(num_tokens=40)
    assert wait_all(senders + receivers) == [KVPoll.Success] * 5, reasons(senders + receivers)
    assert decode_matches(dep.decode, req)


@pytest.mark.parametrize("heads, src_tp, dst_tp", [(4, 2, 1), (2, 1, 4), (2, 4, 1)])
def test_slice_mode_is_bit_exact_too(deployments, heads, src_tp, dst_tp):
    dep = deployments(heads, src_tp, dst_tp, config=small_config(mode="slice"), d_page_size=8)
    req, senders, receivers = dep.run(num_tokens=23)
    handles = senders + receivers
    assert wait_all(handles) == [KVPoll.Success] * len(handles), reasons(handles)
    assert decode_matches(dep.decode, req)
    data = dep.prefill.agents[0].core.data
    assert data.messages_sent > 23  # one message per token and plane


def test_many_concurrent_rooms_share_a_small_ring(deployments):
    # a chunk slice: 3 layers x 2 x 16 tokens x 2 heads x 8 x 2 B = 3 KiB; the ring holds 4
    config = small_config(staging_bytes=3 * 4096)
    dep = deployments(4, 2, 1, config=config, capacity=12 * 40)
    started = []
    for i in range(12):
        req = Request(dep.prefill.layouts[0], 40, seed=10 + i, offset=40 * i)
        prefill_fill(dep.prefill, req)
        started.append((req, start_receivers(dep.decode, req, dep.server.address)))
    for req, _ in started:
        started_senders = start_senders(dep.prefill, req, step=16)
        assert started_senders
    receivers = [h for _, hs in started for h in hs]
    assert wait_all(receivers) == [KVPoll.Success] * 12, reasons(receivers)
    assert all(decode_matches(dep.decode, req) for req, _ in started)
    assert wait_idle([dep.prefill, dep.decode])
    stats = [a.core.stats for a in dep.prefill.agents + dep.decode.agents]
    assert sum(s.ring_waits for s in stats) > 0  # the small ring really made chunks wait


@pytest.mark.parametrize(
    "field, value", [("head_dim", 16), ("dtype", "float16"), ("num_layers", 2)]
)
def test_incompatible_layouts_fail_both_sides_naming_the_field(deployments, field, value):
    dep = deployments(4, 2, 1, **{f"d_{field}": value})
    _, senders, receivers = dep.run(num_tokens=20)
    handles = senders + receivers
    assert wait_all(handles) == [KVPoll.Failed] * len(handles)
    assert all(field in str(h.failure) for h in handles), reasons(handles)
    assert wait_idle([dep.prefill, dep.decode])


def test_prompt_length_disagreement_fails_both_sides(deployments):
    dep = deployments(4, 1, 1)
    req = Request(dep.prefill.layouts[0], 30, seed=3)
    prefill_fill(dep.prefill, req)
    receivers = start_receivers(dep.decode, req, dep.server.address)
    sender = dep.prefill.agents[0].sender(req.room, 31)
    assert wait_all([*receivers, sender]) == [KVPoll.Failed] * 2
    assert "num_tokens" in str(sender.failure) and "num_tokens" in str(receivers[0].failure)


def test_ring_too_small_for_one_chunk_fails_that_room_only(deployments):
    dep = deployments(4, 1, 1, config=small_config(staging_bytes=2048, chunk_tokens=16))
    _, senders, receivers = dep.run(num_tokens=20)
    assert wait_all(senders + receivers) == [KVPoll.Failed] * 2
    assert all("ring too small" in r for r in reasons(senders + receivers)), reasons(
        senders + receivers
    )


def partial_senders(dep, req, tokens):
    """Senders that have handed over only the first `tokens` tokens."""
    senders = []
    for agent, cache in zip(dep.prefill.agents, dep.prefill.caches, strict=True):
        sender = agent.sender(req.room, req.num_tokens)
        sender.add_tokens(req_slots(cache, req)[:tokens])
        senders.append(sender)
    return senders


@pytest.mark.parametrize("side", ["decode", "prefill"])
@pytest.mark.parametrize(
    "when", [KVPoll.Bootstrapping, KVPoll.WaitingForInput, KVPoll.Transferring]
)
def test_abort_reaches_the_other_side(deployments, side, when):
    dep = deployments(4, 2, 2)
    req = Request(dep.prefill.layouts[0], 64, seed=5)
    prefill_fill(dep.prefill, req)
    receivers = start_receivers(dep.decode, req, dep.server.address)
    senders = []
    if when >= KVPoll.WaitingForInput:
        assert wait_for(lambda: all(r.poll() >= KVPoll.WaitingForInput for r in receivers))
    if when == KVPoll.Transferring:
        senders = partial_senders(dep, req, 20)
        assert wait_for(lambda: all(r.poll() == KVPoll.Transferring for r in receivers))
    if side == "decode":
        receivers[0].abort(aborted("client went away"))
    else:
        senders = senders or [
            agent.sender(req.room, req.num_tokens) for agent in dep.prefill.agents
        ]
        senders[0].abort(aborted("prefill preempted"))
    if not senders:
        senders = [agent.sender(req.room, req.num_tokens) for agent in dep.prefill.agents]
    handles = senders + receivers
    assert wait_all(handles) == [KVPoll.Failed] * len(handles), [h.poll() for h in handles]
    word = "client went away" if side == "decode" else "prefill preempted"
    assert all(word in r for r in reasons(handles)), reasons(handles)
    aborter = receivers[0] if side == "decode" else senders[0]  # the others heard from a peer
    assert aborter.failure.kind is FailureKind.ABORTED
    others = [h for h in handles if h is not aborter]
    assert all(h.failure.kind is FailureKind.PEER_ABORTED for h in others), reasons(others)
    assert wait_idle([dep.prefill, dep.decode])


def test_abort_after_success_changes_nothing(deployments):
    dep = deployments(4, 1, 1)
    _, senders, receivers = dep.run(num_tokens=10)
    assert wait_all(senders + receivers) == [KVPoll.Success] * 2
    receivers[0].abort()
    senders[0].abort()
    assert settle(dep.prefill.agents + dep.decode.agents)  # the aborts ran, and turns after
    assert [h.poll() for h in senders + receivers] == [KVPoll.Success] * 2
    assert [h.failure for h in senders + receivers] == [None, None]


def test_silent_prefill_fails_decode_rooms_within_heartbeat_window(deployments):
    dep = deployments(
        4, 1, 1, config=small_config(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)
    )
    req = Request(dep.prefill.layouts[0], 40, seed=8)
    prefill_fill(dep.prefill, req)
    receivers = start_receivers(dep.decode, req, dep.server.address)
    partial_senders(dep, req, 16)
    assert wait_for(lambda: receivers[0].poll() == KVPoll.Transferring)
    dep.prefill.agents[0].core.loop.stop()  # the rank hangs: no more heartbeats, no more data
    began = time.monotonic()
    assert wait_all(receivers, timeout_s=5) == [KVPoll.Failed]
    assert time.monotonic() - began < 2.0
    assert "peer lost" in str(receivers[0].failure)
    assert receivers[0].failure.kind is FailureKind.PEER_LOST
    assert wait_idle([dep.decode])


def test_bootstrap_timeout_when_prefill_never_registers(deployments):
    dep = deployments(4, 1, 1, config=small_config(bootstrap_timeout_s=0.5))
    req = Request(dep.prefill.layouts[0], 10, seed=2)
    receivers = start_receivers(dep.decode, req, "tcp://127.0.0.1:9")  # nobody listens there
    assert wait_all(receivers, timeout_s=5) == [KVPoll.Failed]
    assert "bootstrap" in str(receivers[0].failure)


def test_sender_without_decode_times_out(deployments):
    dep = deployments(4, 1, 1, config=small_config(bootstrap_timeout_s=0.3))
    sender = dep.prefill.agents[0].sender(room=77, num_tokens=10)
    assert wait_all([sender], timeout_s=5) == [KVPoll.Failed]
    assert "timeout" in str(sender.failure)
    assert sender.failure.kind is FailureKind.TIMEOUT


def test_other_rooms_survive_a_failed_one(deployments):
    dep = deployments(4, 2, 1, capacity=120)
    good = Request(dep.prefill.layouts[0], 40, seed=20, offset=0)
    bad = Request(dep.prefill.layouts[0], 40, seed=21, offset=40)
    for req in (good, bad):
        prefill_fill(dep.prefill, req)
    good_rx = start_receivers(dep.decode, good, dep.server.address)
    bad_rx = start_receivers(dep.decode, bad, dep.server.address)
    bad_rx[0].abort(aborted("bad one"))
    good_tx = start_senders(dep.prefill, good)
    assert wait_all(good_rx + good_tx) == [KVPoll.Success] * 3
    assert decode_matches(dep.decode, good)
    assert wait_all(bad_rx) == [KVPoll.Failed]


def test_a_peer_back_after_an_idle_spell_gets_a_fresh_heartbeat_window():
    """Silence while a peer had no rooms with us is no sign of death: its next room must not
    fail at once."""
    from kvferry.transport.peers import PeerTracker

    tracker = PeerTracker(interval_s=1, timeout_s=5)
    now = time.monotonic()
    tracker.add_room("tcp://peer", 1)
    tracker.heard("tcp://peer", now - 100)  # last heard long ago, while idle
    tracker.remove_room("tcp://peer", 1)
    tracker.add_room("tcp://peer", 2)
    assert tracker.silent(now + 1) == []
    assert tracker.silent(now + 10) == ["tcp://peer"]  # and silence from now on still counts


def test_a_step_visits_the_rooms_touched_and_all_of_them_once_per_sweep():
    from kvferry.transport.room import RoomVisits

    visits = RoomVisits(sweep_s=1.0)
    rooms = {room: object() for room in range(100)}
    assert sorted(visits.take(rooms, 10.0)) == list(range(100))  # the first step sweeps
    visits.touch(7)
    visits.touch(7)
    visits.touch(42)
    assert sorted(visits.take(rooms, 10.5)) == [7, 42]
    assert visits.take(rooms, 10.6) == []  # nothing happened since
    visits.touch(3)
    assert sorted(visits.take(rooms, 11.0)) == list(range(100))  # a sweep covers the touched
    assert visits.take_touched() == []
