"""What the HTTP front shows of a daemon: the bodies of `/health` and `/status`.

Both read the daemon's public state only; `/status` adds the latest snapshot of each rank, the
decode daemon's view of its prefill daemons and the prefill daemon's bootstrap server counters.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kvferry.daemon.server.protocol import Snapshot

if TYPE_CHECKING:
    from kvferry.daemon.server.daemon import Daemon


def health(daemon: Daemon) -> tuple[int, dict]:
    """HTTP status and body of /health: 200 only while the daemon can serve a request."""
    status = "ok" if daemon.state == "serving" else daemon.state
    body = {"role": daemon.config.role, "name": daemon.name, "pid": os.getpid()}
    if daemon.probe is not None:
        body["prefill"] = daemon.probe.states()
        if status == "ok" and not daemon.probe.any_usable():
            status = "no_prefill"
    return (200 if status == "ok" else 503), {"status": status, **body}


def status(daemon: Daemon) -> dict:
    snapshots = daemon.metrics.snapshots()
    requests = {"in_flight": daemon.in_flight()}
    for s in snapshots[:1]:
        requests.update(s.queues)
    bootstrap = daemon.bootstrap
    return {
        "role": daemon.config.role,
        "name": daemon.name,
        "state": daemon.state,
        "tp": daemon.config.tp,
        "requests": requests,
        "prefill": daemon.probe.states() if daemon.probe is not None else [],
        "bootstrap": (
            {"address": bootstrap.address, **bootstrap.counters()}
            if bootstrap is not None
            else None
        ),
        "ranks": [_rank(s) for s in snapshots],
    }


def _rank(s: Snapshot) -> dict:
    return {
        "rank": s.rank,
        "rooms": s.rooms,
        "ring": {
            "used_bytes": s.ring_used,
            "capacity_bytes": s.ring_capacity,
            "high_water_bytes": s.ring_high_water,
        },
        "kv_pages": {"used": s.kv_pages_used, "total": s.kv_pages_total},
        "peers": s.peers,
        "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received,
        "messages_sent": s.messages_sent,
        "messages_received": s.messages_received,
        "control_address": s.control_address,
        "pid": s.pid,
    }
