"""Data-plane endpoints a prefill rank sends over, each held by the rooms that send over it.

An endpoint no room holds is kept for PEER_IDLE_S, as an idle control socket is (the next room
from the same decode rank reuses it), then closed. A room lets go of its endpoints only once
nothing of it is in flight, so an endpoint is never closed under a send. The data plane caps
how many are open at once (at the cap, the longest idle one is closed to make room): rooms
registered from many distinct addresses cannot grow them.
"""

from __future__ import annotations

from collections.abc import Callable

from kvferry.transport.core import PEER_IDLE_S, AgentCore


class EndpointPool:
    def __init__(self, core: AgentCore, on_error: Callable[[bytes, str], None]) -> None:
        """`on_error(address, why)` hears, on the loop thread, of an endpoint that broke."""
        self._core, self._on_error = core, on_error
        self.idle_s = PEER_IDLE_S
        self._holders: dict[bytes, set[int]] = {}  # address -> rooms sending over it
        self._idle: dict[bytes, float] = {}  # address -> since when no room holds it; oldest first

    def hold(self, address: bytes, room: int):
        """The endpoint to `address`, held for `room` until `release`. Raises InvalidAddress
        or EndpointLimitError (transport/dataplane.py) and then holds nothing."""
        data = self._core.data
        new = address not in self._holders and address not in self._idle
        if new and self._idle and data.open_endpoints >= data.max_endpoints:
            self._close(next(iter(self._idle)))  # the longest idle one makes room
        endpoint = self._core.endpoint(address, self._on_error)
        self._holders.setdefault(address, set()).add(room)
        self._idle.pop(address, None)
        return endpoint

    def release(self, address: bytes, room: int, now: float) -> None:
        """`room` sends nothing over `address` any more (none of its sends is in flight)."""
        holders = self._holders.get(address)
        if holders is None:
            return
        holders.discard(room)
        if not holders:
            del self._holders[address]
            self._idle[address] = now  # now never decreases: _idle stays oldest first

    def reclaim(self, now: float) -> None:
        """Close the endpoints no room has held for longer than idle_s."""
        while self._idle:
            address, since = next(iter(self._idle.items()))
            if now - since <= self.idle_s:
                return
            self._close(address)

    def _close(self, address: bytes) -> None:
        del self._idle[address]
        self._core.data.close_endpoint(address)
