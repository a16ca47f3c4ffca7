"""The metric families a daemon exports from its ranks' snapshots and its bootstrap server's
counters: (name, help, field) each, documented in docs/metrics.md (daemon/server/metrics.py
exports them)."""

# (name, help, Snapshot field) of the per-rank values; counters end in _total
COUNTERS = (
    ("kvferry_kv_bytes_sent", "KV bytes sent over the data plane", "bytes_sent"),
    ("kvferry_kv_bytes_received", "KV bytes received over the data plane", "bytes_received"),
    ("kvferry_ucx_messages_sent", "Data-plane (UCX) messages sent", "messages_sent"),
    ("kvferry_ucx_messages_received", "Data-plane (UCX) messages received", "messages_received"),
    ("kvferry_ring_waits", "Chunks that found the staging ring full and waited", "ring_waits"),
    (
        "kvferry_receives_posted_ahead",
        "Data messages whose receive a decode rank posted before they came (no probe, no turn)",
        "receives_ahead",
    ),
    ("kvferry_ring_wait_seconds", "Time chunks spent waiting for staging room", "ring_wait_s"),
    ("kvferry_bad_frames", "Malformed or unexpected control frames refused", "bad_frames"),
    (
        "kvferry_transfer_internal_errors",
        "Control messages or rooms whose handling raised on the transfer thread (the room failed)",
        "internal_errors",
    ),
    (
        "kvferry_transfer_rooms",
        "Rooms this rank delivered (prefill) or took in (decode)",
        "rooms_succeeded",
    ),
    (
        "kvferry_transfer_cpu_seconds",
        "CPU time of the rank's transfer thread (control messages, copy and send issuing)",
        "transfer_cpu_s",
    ),
    (
        "kvferry_transfer_wait_cpu_seconds",
        "Of the transfer thread's CPU time: its wait (the poll, and re-taking the GIL after it)",
        "wait_cpu_s",
    ),
    (
        "kvferry_transfer_ucx_cpu_seconds",
        "Of the transfer thread's CPU time: inside UCX's progress and arm calls",
        "ucx_cpu_s",
    ),
    (
        "kvferry_transfer_loop_turns",
        "Turns of the rank's transfer loop: each woken by a frame, a completion, a posted call "
        "or its timer (an idle rank takes one per heartbeat interval)",
        "loop_turns",
    ),
    (
        "kvferry_transfer_loop_timer_turns",
        "Transfer loop turns that only the loop's timer woke (heartbeats, timeouts, backstop)",
        "loop_timer_turns",
    ),
    (
        "kvferry_transfer_loop_quiet_turns",
        "Transfer loop turns that only progressed UCX's traffic (a fragment of a message still "
        "arriving): no completion, no new message, so the step did not run",
        "loop_quiet_turns",
    ),
    (
        "kvferry_transfer_loop_sleep_events",
        "UCX events the transfer thread took while asleep, in native code without a turn of "
        "the loop (a rendezvous, a fragment, a completion whose scatter it launched)",
        "loop_sleep_events",
    ),
    (
        "kvferry_graph_forwards",
        "Forwards run as replays of CUDA graphs captured at start-up (of kvferry_forward_seconds' "
        "count: the rest ran eagerly)",
        "graph_forwards",
    ),
    (
        "kvferry_engine_cpu_seconds",
        "CPU time of the rank's engine thread (scheduling, input building, kernel launches)",
        "engine_cpu_s",
    ),
)
GAUGES = (
    ("kvferry_ring_used_bytes", "Staging ring bytes in use", "ring_used"),
    (
        "kvferry_native_data_path",
        "1 if the rank's data messages go through kvferry's native path, 0 through ucxx's API",
        "native_data_path",
    ),
    ("kvferry_ring_capacity_bytes", "Staging ring size", "ring_capacity"),
    ("kvferry_ring_high_water_bytes", "Most staging ring bytes ever in use", "ring_high_water"),
    ("kvferry_kv_pages_used", "KV cache pages held by requests", "kv_pages_used"),
    ("kvferry_kv_pages_capacity", "KV cache pages", "kv_pages_total"),  # not _total: a gauge
    ("kvferry_kv_pool_bytes", "KV cache pool size", "kv_pool_bytes"),
    (
        "kvferry_device_memory_peak_bytes",
        "Peak device memory held by the torch allocator (weights, KV pool, activations; "
        "0 on a CPU); the staging ring is kvferry_ring_capacity_bytes",
        "memory_peak",
    ),
)
# (name, help, key of BootstrapServer.counters()): the prefill daemon's bootstrap server
BOOTSTRAP = (
    (
        "kvferry_bootstrap_bad_frames",
        "Bootstrap server frames refused: malformed, of several parts, or of an unexpected type",
        "bad_frames",
    ),
    (
        "kvferry_bootstrap_refused_registrations",
        "Rank registrations refused by the bootstrap server for a wrong token",
        "refused_registrations",
    ),
    (
        "kvferry_bootstrap_dropped_replies",
        "Bootstrap server replies whose send failed (ZeroMQ would not queue them)",
        "dropped_replies",
    ),
    (
        "kvferry_bootstrap_failed_frames",
        "Bootstrap server frames whose handling raised (each one a bug; the server kept serving)",
        "failed_frames",
    ),
)
# the limits whose refusals kvferry_limit_refusals_total counts, by their config names: the
# daemon counts its HTTP front's and prompts'; the ranks count their control sockets'
LIMITS = (
    "max_prompt_tokens",
    "http_max_requests_per_client",
    "http_max_body_bytes",
    "max_frame_bytes",
    "max_rooms_per_peer",
    "max_pending_rooms_per_peer",
)
