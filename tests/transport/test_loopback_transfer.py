"""End-to-end transfers between in-process agents over the loopback data plane."""

import time

import pytest
import torch

from kvferry.staging.copy_stream import Fence
from kvferry.staging.plan import plan_head_transfers
from kvferry.transport.dataplane import DataOp, DoneOp
from kvferry.transport.loopback import LoopbackDataPlane
from kvferry.transport.room import KVPoll
from kvferry.transport.tags import DONE_PIECE, unpack_tag
from support.kvsim import TP_PAIRS
from support.transfer_sim import (
    Deployment,
    count_calls,
    decode_matches,
    settle,
    small_config,
    wait_all,
    wait_for,
    wait_idle,
)


def _transfer_ok(dep: Deployment, num_tokens: int) -> None:
    req, senders, receivers = dep.run(num_tokens=num_tokens)
    states = wait_all(senders + receivers)
    assert states == [KVPoll.Success] * len(states), [str(h.failure) for h in senders + receivers]
    for receiver in receivers:  # Success hands over the room's last scatter (inline on a CPU)
        assert receiver.kv_fence is not None and receiver.kv_fence.done()
        receiver.order_kv()
        receiver.wait_kv()
    assert decode_matches(dep.decode, req)
    assert all(r.first_token == 42 for r in receivers)
    assert wait_idle([dep.prefill, dep.decode])


@pytest.mark.parametrize("heads, src_tp, dst_tp", TP_PAIRS)
def test_heads_arrive_bit_exact(heads, src_tp, dst_tp):
    dep = Deployment(heads, src_tp, dst_tp, d_page_size=4)
    try:
        _transfer_ok(dep, num_tokens=45)
    finally:
        dep.close()


@pytest.mark.parametrize("layer_group, groups", [(1, 3), (2, 2), (3, 1), (7, 1)])
@pytest.mark.parametrize("heads, src_tp, dst_tp", [(4, 2, 1), (2, 1, 4), (8, 4, 2)])
def test_layer_wise_messages_arrive_bit_exact(heads, src_tp, dst_tp, layer_group, groups):
    """Three layers in groups of `layer_group`: one message per (chunk, group, writer pair)."""
    config = small_config(layer_group=layer_group)
    dep = Deployment(heads, src_tp, dst_tp, config=config, layers=3, d_page_size=4)
    try:
        _transfer_ok(dep, num_tokens=45)
        sent = sum(agent.core.data.messages_sent for agent in dep.prefill.agents)
        pairs = len(plan_head_transfers(heads, src_tp, dst_tp))
        assert sent == -(-45 // config.chunk_tokens) * groups * pairs
    finally:
        dep.close()


@pytest.mark.parametrize("layer_group, groups", [(0, 1), (2, 2)])
@pytest.mark.parametrize("heads, src_tp, dst_tp", [(4, 2, 1), (2, 1, 4)])
def test_chunks_handed_over_together_travel_as_one_message(
    heads, src_tp, dst_tp, layer_group, groups
):
    """Decode takes messages of several chunks (up to 256 KiB): a prompt's 45 tokens handed over
    at once (one forward) go as one message per (layer group, writer pair), and land
    bit-exact."""
    config = small_config(layer_group=layer_group, max_message_bytes=256 << 10)
    dep = Deployment(heads, src_tp, dst_tp, config=config, layers=3, d_page_size=4)
    try:
        req, senders, receivers = dep.run(num_tokens=45, step=45)
        assert wait_all(senders + receivers) == [KVPoll.Success] * len(senders + receivers)
        for receiver in receivers:
            receiver.wait_kv()
        assert decode_matches(dep.decode, req)
        sent = sum(agent.core.data.messages_sent for agent in dep.prefill.agents)
        assert sent == groups * len(plan_head_transfers(heads, src_tp, dst_tp))
    finally:
        dep.close()


def test_a_message_of_chunks_stays_within_what_decode_takes():
    """With room for two chunks of a writer in the largest message decode takes, the three
    chunks handed over together go as two messages (two chunks, then one)."""
    heads, src_tp, dst_tp, layers, head_dim = 4, 2, 1, 3, 8
    token_bytes = 2 * layers * (heads // src_tp) * head_dim * 2  # K and V planes, bf16
    config = small_config(max_message_bytes=2 * 16 * token_bytes)  # chunks of 16 tokens
    dep = Deployment(
        heads, src_tp, dst_tp, config=config, layers=layers, head_dim=head_dim, d_page_size=4
    )
    try:
        assert dep.prefill.layouts[0].local_heads == heads // src_tp
        req, senders, receivers = dep.run(num_tokens=45, step=45)
        assert wait_all(senders + receivers) == [KVPoll.Success] * len(senders + receivers)
        for receiver in receivers:
            receiver.wait_kv()
        assert decode_matches(dep.decode, req)
        assert [agent.core.data.messages_sent for agent in dep.prefill.agents] == [2, 2]
    finally:
        dep.close()


def test_layer_wise_mla_latent_arrives_bit_exact():
    config = small_config(layer_group=2)
    dep = Deployment(1, 2, 2, config=config, layers=3, mla=True, head_dim=32)
    try:
        _transfer_ok(dep, num_tokens=20)
    finally:
        dep.close()


@pytest.mark.parametrize("layer_group", [0, 1])
def test_every_step_of_a_transfer_is_woken_by_an_event_not_a_timer(layer_group):
    """With heartbeats a minute apart the loops take no timer turn during a transfer: KV handed
    over already written, registrations, copies, messages and the first token must each wake
    whoever acts next, or the transfer stalls until a heartbeat."""
    config = small_config(
        layer_group=layer_group, heartbeat_interval_s=60.0, heartbeat_timeout_s=180.0
    )
    dep = Deployment(4, 2, 1, config=config, layers=3, d_page_size=4)
    try:
        for seed, num_tokens in enumerate((45, 16), start=1):  # several chunks, then one
            req, senders, receivers = dep.run(num_tokens=num_tokens, seed=seed)
            states = wait_all(senders + receivers, timeout_s=20.0)
            why = [str(h.failure) for h in senders + receivers]
            assert states == [KVPoll.Success] * len(states), why
            assert decode_matches(dep.decode, req)
    finally:
        dep.close()


class CountingPlane(LoopbackDataPlane):
    """A loopback plane that counts how often its owner progresses it."""

    def __init__(self):
        super().__init__()
        self.progressed = 0

    def _progress(self):
        self.progressed += 1
        super()._progress()


def test_turns_with_nothing_for_the_data_plane_leave_it_alone():
    """A turn woken by a posted call progresses the data plane only if operations were posted
    since it last ran; turns woken by its descriptor still progress it (the transfer works)."""
    config = small_config(heartbeat_interval_s=60.0, heartbeat_timeout_s=180.0)
    dep = Deployment(4, 1, 1, config=config, data_plane=CountingPlane)
    try:
        req, senders, receivers = dep.run(num_tokens=40)
        assert wait_all(senders + receivers) == [KVPoll.Success] * 2
        assert decode_matches(dep.decode, req)
        agents = dep.prefill.agents + dep.decode.agents
        assert settle(agents)
        planes = [agent.core.data for agent in agents]
        before = [plane.progressed for plane in planes]
        turns = [agent.core.loop.turns for agent in agents]
        assert settle(agents, turns=20)
        taken = [agent.core.loop.turns - t for agent, t in zip(agents, turns, strict=True)]
        assert min(taken) >= 20
        assert [plane.progressed for plane in planes] == before
    finally:
        dep.close()


class FragmentingPlane(LoopbackDataPlane):
    """A loopback plane that delivers each message the way UCX's tcp transport does: several
    wake-ups of its descriptor (pieces) before the whole message can be probed. A progress
    that brings no whole message is `quiet`."""

    PIECES = 4

    def __init__(self):
        super().__init__()
        self._pieces: list = []  # (tag, payload, pieces still to come), oldest first
        self.advances = 0  # the owner's steps

    def _send(self, endpoint, buffer, tag, group):
        peer = self._registry.get(endpoint)
        if peer is None:
            return super()._send(endpoint, buffer, tag, group)
        payload = buffer.view(torch.uint8).cpu().numpy().tobytes()
        with peer._lock:
            peer._pieces.append([tag, payload, self.PIECES])
        peer._arrived.ring()
        return DoneOp()

    def _progress(self):
        super()._progress()
        with self._lock:
            if not self._pieces:
                self.quiet = False
                return
            self._pieces[0][2] -= 1
            whole = self._pieces[0][2] == 0
            if whole:
                tag, payload, _ = self._pieces.pop(0)
                self._queue.append((tag, payload))
        self.quiet = not whole
        if self._pieces:
            self._arrived.ring()  # the next piece is in


def test_wakes_for_pieces_of_a_message_skip_the_step_and_lose_nothing():
    """Turns woken by the data plane alone with nothing whole in yet re-arm and sleep (quiet
    turns, no step); the messages still land bit-exact, and every transfer ends in Success
    with heartbeats a minute apart (no timer rescues a lost event)."""
    config = small_config(heartbeat_interval_s=60.0, heartbeat_timeout_s=180.0)
    dep = Deployment(4, 2, 1, config=config, layers=3, d_page_size=4, data_plane=FragmentingPlane)
    try:
        decode = dep.decode.agents[0].core
        steps = count_calls(decode, "_advance")
        for seed, num_tokens in enumerate((45, 16), start=1):
            req, senders, receivers = dep.run(num_tokens=num_tokens, seed=seed)
            states = wait_all(senders + receivers)
            assert states == [KVPoll.Success] * len(states), [str(h.failure) for h in receivers]
            assert decode_matches(dep.decode, req)
        assert decode.quiet_turns >= FragmentingPlane.PIECES - 1
        assert steps[0] <= decode.loop.turns - decode.quiet_turns
    finally:
        dep.close()


def test_a_room_succeeds_once_its_last_scatter_is_queued_not_once_it_ran():
    """The decode engine orders its stream after the room's last scatter (`kv_fence`), so the
    room succeeds in the turn that queues it. Here every receive completes only once the
    prefill ranks' TransferDone is in, every scatter's fence stays pending (a device still
    running it) and the rooms' periodic sweep is pushed out of reach: the rooms succeed all
    the same, holding their ring regions until the fences fire."""
    dep = Deployment(4, 2, 1, d_page_size=4)
    arrived = ran = False

    class Receiving(DataOp):  # the bytes are in (loopback copies inline); the op says not yet
        def __init__(self, op: DataOp) -> None:
            self.op = op

        def done(self) -> bool:
            return arrived

        def error(self):
            return self.op.error()

    class Running(Fence):  # likewise the scatter ran inline on the CPU
        def done(self) -> bool:
            return ran

    try:
        for agent in dep.decode.agents:
            data, copies = agent.core.data, agent.core.copies
            data._recv = lambda tag, *a, _r=data._recv: (  # the KV's receives, not TransferDone's
                _r(tag, *a) if unpack_tag(tag)[1] == DONE_PIECE else Receiving(_r(tag, *a))
            )
            copies.scatter = lambda *a, _s=copies.scatter, **k: (_s(*a, **k), Running())[1]
            visits = agent._visits  # a room is visited only for news of it
            visits._sweep_s, visits._next_sweep = 3600.0, time.monotonic() + 3600.0
        req, senders, receivers = dep.run(num_tokens=45)

        def told_done() -> bool:  # every prefill rank's TransferDone is in, at every decode rank
            rooms = [room for agent in dep.decode.agents for room in agent.rooms.values()]
            return len(rooms) == len(receivers) and all(
                r.rank_peers and len(r.first_tokens) == len(r.rank_peers) for r in rooms
            )

        assert wait_for(told_done)
        assert settle(dep.decode.agents)
        assert [r.poll() for r in receivers] == [KVPoll.Transferring] * len(receivers)
        arrived = True
        for agent in dep.decode.agents:
            agent.core.loop.wake()
        states = wait_all(senders + receivers)
        assert states == [KVPoll.Success] * len(states), [str(h.failure) for h in receivers]
        assert all(isinstance(r.kv_fence, Running) for r in receivers)
        assert all(a.ring.used_bytes > 0 for a in dep.decode.agents)  # not released yet
        assert decode_matches(dep.decode, req)
        ran = True
        for agent in dep.decode.agents:
            agent.core.loop.wake()
        assert wait_idle([dep.prefill, dep.decode])
    finally:
        dep.close()
