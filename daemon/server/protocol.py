"""What a daemon and its rank worker processes tell each other (pickled over a Pipe).

The daemon sends commands to rank 0, which broadcasts them to the other ranks at the start of
a step, so every rank applies them at the same step. Every rank reports a `Snapshot` for the
metrics now and then; rank 0 also reports what its engine produced (`engine.outputs.StepOutput`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.transport.failure import Failure


# --- daemon -> rank 0 ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    room: int
    prompt: list[int]
    params: SamplingParams
    bootstrap: str | None = None  # decode: the prefill group that sends the KV
    retry: bool = False  # decode: another attempt at a request that failed at another prefill


@dataclass(frozen=True)
class AbortRoom:
    room: int
    failure: Failure


@dataclass(frozen=True)
class ForgetPrefill:
    """Decode: the prefill group behind `bootstrap` is now `incarnation` (None: it stopped
    answering); the ranks drop what they cached of any other and never use it again."""

    bootstrap: str
    incarnation: str | None


@dataclass(frozen=True)
class Stop:
    reason: str


Command = Submit | AbortRoom | ForgetPrefill | Stop


# --- ranks -> daemon ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RankReady:
    rank: int


@dataclass(frozen=True)
class Fatal:
    """The rank cannot go on; the daemon fails its requests and exits non-zero."""

    rank: int
    error: str


@dataclass(frozen=True)
class Snapshot:
    """One rank's counters and gauges; the histograms' samples since the last snapshot."""

    rank: int
    rooms: dict[str, int]  # by KVPoll name
    ring_used: int
    ring_capacity: int
    ring_high_water: int
    kv_pages_used: int
    kv_pages_total: int
    queues: dict[str, int]  # requests by stage on this rank
    bytes_sent: int
    bytes_received: int
    messages_sent: int
    messages_received: int
    ring_waits: int
    ring_wait_s: float
    bad_frames: int
    failures: dict[str, int]
    peers: list[str]
    forward_s: list[float]
    transfer_s: list[float]
    rooms_succeeded: int  # rooms this rank delivered (prefill) or took in (decode)
    transfer_cpu_s: float  # CPU time of the rank's transfer thread
    engine_cpu_s: float  # CPU time of the rank's engine thread (scheduling, launches)
    kv_pool_bytes: int
    memory_peak: int  # peak bytes held by the torch allocator (0 on a CPU)
    control_address: str = ""  # the rank's control ROUTER (where peers send frames)
    pid: int = 0  # the rank's process
    internal_errors: int = 0  # control messages or rooms whose handling raised (room failed)
    loop_turns: int = 0  # turns of the rank's transfer loop (woken by an event or its timer)
    loop_timer_turns: int = 0  # of which only the loop's timer woke it
    loop_quiet_turns: int = 0  # of which only progressed UCX's traffic (no step ran)
    loop_sleep_events: int = 0  # UCX events the loop's native sleep took without a turn
    loop_wakes: dict[str, int] = field(default_factory=dict)  # turns by what woke them
    wait_cpu_s: float = 0.0  # of transfer_cpu_s: the loop's wait (poll, re-taking the GIL)
    ucx_cpu_s: float = 0.0  # of transfer_cpu_s: inside UCX's progress and arm
    limit_refusals: dict[str, int] = field(default_factory=dict)  # control frames refused, by limit
    receives_ahead: int = 0  # decode: data receives posted before their messages came
    graph_forwards: int = 0  # forwards run as CUDA graph replays (engine.cuda_graphs)
    native_data_path: int = 0  # 1: data messages go through transport/native.py, 0: ucxx's API
    gc_pauses: list[tuple[int, float]] = field(default_factory=list)  # (generation, s) since last
