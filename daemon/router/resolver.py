"""What a configured target stands for: `http://<host>:<port>` with a host that is a DNS name
may be several decode daemons (a Kubernetes headless service answers with one address per
pod). A resolver turns a target into the URLs of those daemons.

The router takes any resolver (a test passes one that it controls); the system one reads
`KVFERRY_HOSTS_FILE` before DNS, like the decode daemon's prefill addresses
(`transport/resolve.py`), in a worker thread so the event loop never waits on a lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from kvferry.transport.resolve import bracketed, resolve

# A configured target URL -> the URLs of the decode daemons it stands for (OSError: none now).
Resolver = Callable[[str], Awaitable[list[str]]]

RESOLVE_TIMEOUT_S = 10.0  # one lookup; the system resolver's own retries fit in it
_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical(url: str) -> str:
    """`url` as the pool names it: scheme://host:port, no trailing slash, port spelt out."""
    parts = urlsplit(url)
    assert parts.hostname, "targets are checked for a host at load"
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    return f"{parts.scheme}://{bracketed(parts.hostname)}:{port}"


async def system_resolver(url: str) -> list[str]:
    """One URL per address the host has (hosts file first, then DNS), sorted; an IP address
    as itself. OSError when the name has no address, or the lookup takes too long."""
    parts = urlsplit(canonical(url))
    tcp = f"tcp://{bracketed(parts.hostname)}:{parts.port}"
    try:
        found = await asyncio.wait_for(asyncio.to_thread(resolve, tcp), RESOLVE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise OSError(f"{parts.hostname}: no answer within {RESOLVE_TIMEOUT_S:g} s") from None
    return [f"{parts.scheme}://{address.removeprefix('tcp://')}" for address in found]
