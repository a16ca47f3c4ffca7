"""Transfer settings shared by the prefill and decode sides of the transport."""

from __future__ import annotations

from typing import Literal

import msgspec

DEFAULT_STAGING_BYTES = 256 << 20  # a rank's staging ring when nothing sizes it


def prefill_ring_bytes(batch_tokens: int, bytes_per_token: int) -> int:
    """The staging ring a prefill rank gets unless configured: one forward's KV
    (`batch_tokens` x the rank's `bytes_per_token`, all layers), so that every chunk of a
    forward is gathered as soon as it is written instead of waiting for an earlier one's send;
    at least DEFAULT_STAGING_BYTES."""
    return max(DEFAULT_STAGING_BYTES, batch_tokens * bytes_per_token)


class TransferConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How KV moves between ranks. Every wait the transport makes is bounded by one of these."""

    mode: Literal["staged", "slice"] = "staged"  # slice: one message per token and plane
    chunk_tokens: int = 512  # tokens per transfer chunk (decode proposes it at registration)
    # Layers per message (decode proposes it too); prefill records a ready event every this
    # many layers of its forward, so a group is sent while later layers compute. 0: whole chunk.
    layer_group: int = 0
    # layer-wise: split the last group in halves down to one layer (layout.layer_groups), so
    # what is left to send once the forward has ended is one layer's KV (decode proposes it too)
    layer_taper: bool = True
    # each rank's staging ring; None: DEFAULT_STAGING_BYTES, or what a daemon sizes it to
    # (prefill: one forward's KV, `prefill_ring_bytes`)
    staging_bytes: int | None = None
    # decode: the largest data message it takes (decode proposes it too). Chunks that are ready
    # together travel as one message up to this size (and half the prefill rank's ring), which
    # saves the host time of the messages it replaces. 0: one message per chunk
    max_message_bytes: int = 0
    host: str = "127.0.0.1"  # interface the control sockets bind to
    # registration of a room with every peer rank (a decode rank allows one heartbeat more:
    # prefill ranks accept registrations in their heartbeats)
    bootstrap_timeout_s: float = 30.0
    transfer_timeout_s: float = 300.0  # a room's whole life, registration to Success
    ring_wait_timeout_s: float = 30.0  # one chunk waiting for staging room
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0  # peer silent this long: its rooms fail
    max_frame_bytes: int = 1 << 20  # control frames above this are refused unread
    # prefill: rooms one decode rank (control address) may hold on a rank at once, and of
    # those, rooms it registered that no prompt has claimed yet; past either it is refused
    max_rooms_per_peer: int = 2048
    max_pending_rooms_per_peer: int = 512
    ucx_tls: str | None = None  # UCX_TLS for the data plane; None keeps UCX's own choice
    # "LOW-HIGH": the TCP ports the control sockets bind in, and UCX's tcp transport listens and
    # connects from (UCX_TCP_PORT_RANGE); None: any port the OS chooses
    control_ports: str | None = None
    ucx_ports: str | None = None
    # send and receive data messages through native code (transport/ucx_native.c, built at
    # first use): a receive's completion launches its scatter; false: ucxx's Python API
    native_ucx: bool = True
    # decode, native path: post a room's receives as it registers, before its messages come,
    # while the ring is at most half full (transport/recv_pipeline.py); false: each receive is
    # posted once its message has come (a probe, a turn); None: where the cache is on a GPU
    # (it costs a cache in host memory, whose copies run on the transfer threads: benchmarks.md)
    post_receives_ahead: bool | None = None

    @property
    def ring_bytes(self) -> int:
        """The staging ring's size."""
        return DEFAULT_STAGING_BYTES if self.staging_bytes is None else self.staging_bytes

    @property
    def control_port_range(self) -> tuple[int, int] | None:
        return port_range(self.control_ports)

    def __post_init__(self) -> None:
        if self.staging_bytes is not None and self.staging_bytes < 1:
            raise ValueError(f"staging_bytes={self.staging_bytes} must be >= 1")
        if self.max_message_bytes < 0:
            raise ValueError(
                f"max_message_bytes={self.max_message_bytes} must be >= 0 (0: a chunk per message)"
            )
        for name in (
            "chunk_tokens",
            "max_frame_bytes",
            "max_rooms_per_peer",
            "max_pending_rooms_per_peer",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.layer_group < 0:
            raise ValueError(f"layer_group={self.layer_group} must be >= 0 (0: whole chunk)")
        if self.layer_group and self.mode == "slice":
            raise ValueError("layer_group applies to staged mode only; slice mode sends rows")
        for name in (
            "bootstrap_timeout_s",
            "transfer_timeout_s",
            "ring_wait_timeout_s",
            "heartbeat_interval_s",
            "heartbeat_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("control_ports", "ucx_ports"):
            try:
                port_range(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}={getattr(self, name)!r}: {exc}") from None
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s={self.heartbeat_timeout_s} must exceed "
                f"heartbeat_interval_s={self.heartbeat_interval_s}"
            )


def port_range(spec: str | None) -> tuple[int, int] | None:
    """(low, high), both included, of "LOW-HIGH" (or one port); None for None."""
    if spec is None:
        return None
    low, _, high = spec.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        raise ValueError("not LOW-HIGH (e.g. 31000-31099)") from None
    if not 1 <= first <= last < 65536:
        raise ValueError("not a range of TCP ports (1-65535, low <= high)")
    return first, last
