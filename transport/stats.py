"""One agent's counters as one value: what an engine or a daemon reads of its transfer agent
(`PrefillAgent.stats()`, `DecodeAgent.stats()`), so that none of them reaches into the agent's
core, loop, ring or peers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvferry.transport.room import KVPoll

if TYPE_CHECKING:
    from kvferry.staging.ring import RingAllocator
    from kvferry.transport.core import AgentCore


@dataclass(frozen=True)
class AgentStats:
    """A snapshot of one transfer agent, taken from any thread (each counter is read once;
    together they are not one atomic cut of the loop thread's state)."""

    rooms: dict[str, int]  # open rooms by KVPoll state name, every state present
    ring_used: int  # staging ring bytes; all three 0 in slice mode (no ring)
    ring_capacity: int
    ring_high_water: int
    bytes_sent: int
    bytes_received: int
    messages_sent: int
    messages_received: int
    ring_waits: int  # chunks that found the staging ring full
    ring_wait_s: float
    bad_frames: int
    internal_errors: int
    failures: dict[str, int]  # failed rooms by reason category
    rooms_succeeded: int
    copy_s: float  # summed gather/scatter time, queued until the loop saw it done
    wire_s: float  # summed send/receive time
    peers: list[str]  # peers this rank has rooms with
    transfer_cpu_s: float  # CPU time of the loop thread
    control_address: str
    loop_turns: int = 0  # turns the loop thread took (each woken by an event or its timer)
    loop_timer_turns: int = 0  # of which only the timer woke it
    loop_quiet_turns: int = 0  # of which only progressed UCX's traffic (AgentCore._turn)
    # the data plane's events its native sleep took without a turn (transport/loop.py)
    loop_sleep_events: int = 0
    # turns by what woke them (transport/loop.py WAKE_CAUSES; a turn counts once under each)
    loop_wakes: dict[str, int] = field(default_factory=dict)
    # parts of transfer_cpu_s: the loop's wait (poll, re-taking the GIL) and UCX's calls
    wait_cpu_s: float = 0.0
    ucx_cpu_s: float = 0.0
    limit_refusals: dict[str, int] = field(default_factory=dict)  # frames refused, by limit
    native_data_path: bool = False  # data messages go through transport/native.py
    receives_ahead: int = 0  # decode: receives posted before their messages came


def agent_stats(core: AgentCore, rooms: Iterable, ring: RingAllocator | None) -> AgentStats:
    """`rooms`: the agent's open rooms (each with a `status`), read from the caller's thread."""
    by_state = {state.name: 0 for state in KVPoll}
    for room in list(rooms):
        by_state[room.status.state.name] += 1
    data, stats = core.data, core.stats
    return AgentStats(
        rooms=by_state,
        ring_used=ring.used_bytes if ring else 0,
        ring_capacity=ring.capacity if ring else 0,
        ring_high_water=ring.high_water_bytes if ring else 0,
        bytes_sent=data.bytes_sent,
        bytes_received=data.bytes_received,
        messages_sent=data.messages_sent,
        messages_received=data.messages_received,
        ring_waits=stats.ring_waits,
        ring_wait_s=stats.ring_wait_s,
        bad_frames=stats.bad_frames,
        internal_errors=stats.internal_errors,
        failures=dict(stats.failures),
        rooms_succeeded=stats.rooms_succeeded,
        copy_s=stats.copy_s,
        wire_s=stats.wire_s,
        peers=core.peers.active(),
        transfer_cpu_s=core.loop.cpu_seconds(),
        control_address=core.control.address,
        loop_turns=core.loop.turns,
        loop_timer_turns=core.loop.timer_turns,
        loop_quiet_turns=core.quiet_turns,
        loop_sleep_events=data.sleep_events,
        loop_wakes=dict(core.loop.wakes),
        wait_cpu_s=core.loop.wait_cpu_s,
        ucx_cpu_s=stats.ucx_cpu_s,
        limit_refusals=dict(stats.limit_refusals),
        native_data_path=getattr(data, "native", False),
        receives_ahead=stats.receives_ahead,
    )
