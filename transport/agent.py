"""What every transfer agent offers beyond its role: the members prefill's and decode's agents
share. The role agents (sender.py, receiver.py) add their handle factory (`sender` /
`receiver`) and the `*_on_loop` operations their handles post; engines use nothing else
(handles.py lists the contract)."""

from __future__ import annotations

from collections.abc import Callable

from kvferry.transport.core import AgentCore
from kvferry.transport.failure import Failure
from kvferry.transport.stats import AgentStats, agent_stats


class TransferAgent:
    """Base of PrefillAgent and DecodeAgent: they set `core` and `rooms` (room id -> the role's
    room state, owned by the loop thread)."""

    core: AgentCore
    rooms: dict

    @property
    def ring(self):
        return self.core.staging.ring if self.core.staging is not None else None

    def stats(self) -> AgentStats:
        """This agent's counters, rooms by state and ring use; safe from any thread."""
        return agent_stats(self.core, self.rooms.values(), self.ring)

    @property
    def bell(self):
        """Rings whenever one of this agent's rooms changes state (or its thread dies): the
        engine's thread sleeps on it (`fileno()`, then `clear()` before looking) instead of
        polling the handles."""
        return self.core.bell

    @property
    def thread_failure(self) -> Failure | None:
        """Why the transfer (loop) thread died, or None while it runs; safe from any thread."""
        return self.core.thread_failure

    def wake(self) -> None:
        """Give the loop thread a turn now (e.g. the engine filled in a KVWritten)."""
        self.core.loop.wake()

    def post(self, call: Callable[[], None], wake: bool = True) -> None:
        """Run `call()` on the loop thread, soon; the only way to reach a `*_on_loop` method
        from another thread. `wake=False`: at the loop's next turn (the caller wakes it)."""
        self.core.loop.post(call, wake)
