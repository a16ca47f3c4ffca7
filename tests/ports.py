"""Ports for test daemons, taken below the kernel's ephemeral range.

A port picked by binding port 0 comes from the ephemeral range, where any outgoing connection
or another daemon's own port-0 bind can take it again before the daemon under test binds it.
Below that range only explicit binds compete, and each port is handed out once per session.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nobody listens on, none handed out before in this process."""
    low, high = 20000, _ephemeral_start()
    if high - low < 1000:
        low = max(1024, high - 10000)
    ports: list[int] = []
    for _ in range(100 * count):
        port = random.randrange(low, high)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports between {low} and {high}")


def free_port() -> int:
    return free_ports(1)[0]
