"""How a request's tokens get from the daemon's thread to the HTTP front's event loop.

The daemon's thread puts `(new tokens, finish reason or None)` for each request as its steps
end. Every put of a step goes over in one hand-off, `Inbox`: one wake of the loop however many
streams a step fed, where a wake per stream would cost a write to the loop's pipe and a turn of
it each. A stream's handler then takes everything that came for it since it last looked as one
event (`TokenEvents.take`): one that fell behind catches up with one larger chunk instead of
a chunk per step, so under load the front writes fewer chunks rather than falling further
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

Event = tuple[list[int], str | None]  # (new tokens, finish reason: None until the last)


class Inbox:
    """Events put from any thread, delivered on `loop` in batches: one `call_soon_threadsafe`
    for all that come before the loop gets to them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: deque[tuple[TokenEvents, Event]] = deque()
        self._scheduled = False

    def put(self, events: TokenEvents, item: Event) -> None:
        """Safe from any thread, never blocks. Appended before the flag is read, and the flag
        cleared before the batch is taken: a put the running delivery misses schedules the
        next one."""
        self._pending.append((events, item))
        if not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        pending = self._pending
        for _ in range(len(pending)):
            events, item = pending.popleft()
            events.arrived(item)


def inbox_of(state) -> Inbox:
    """The inbox of the front whose app state is `state`, made on its loop at first use."""
    inbox = getattr(state, "token_inbox", None)
    if inbox is None:
        inbox = state.token_inbox = Inbox(asyncio.get_running_loop())
    return inbox


class TokenEvents:
    """One request's events: put by the daemon's thread (`put`, through the inbox), taken by
    its handler on the loop (`take`)."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: Event) -> None:
        self._inbox.put(self, item)

    def arrived(self, item: Event) -> None:
        """On the loop: `item` is here."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, timeout_s: float, gone: asyncio.Future | None = None) -> Event | None:
        """Every event that came since the last take, as one: their tokens in order and the
        finish if it is among them (nothing after a finish is taken). Waits up to `timeout_s`
        (inf: no limit) for one: TimeoutError past it; None if `gone` is done first."""
        if not self._items:
            timeout = None if math.isinf(timeout_s) else max(timeout_s, 0.0)
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                waits = (waiter,) if gone is None else (waiter, gone)
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiter = None
            if not self._items:
                if gone is not None and gone.done():
                    return None
                raise TimeoutError(f"no event within {timeout_s:g} s")
        tokens, finish = self._items.popleft()
        if self._items and finish is None:
            tokens = list(tokens)
            while self._items and finish is None:
                more, finish = self._items.popleft()
                tokens.extend(more)
        return tokens, finish
