"""How a request's tokens get from the daemon's thread to the HTTP front's event loop.

The daemon's thread puts `(new tokens, finish reason or None)` for each request as its steps
end. Every put of a step goes over in one hand-off, `Inbox`: one wake of the loop however many
streams a step fed, where a wake per stream would cost a write to the loop's pipe and a turn of
it each. A stream's handler then takes everything that came for it since it last looked as one
event (`TokenEvents.take`): one that fell behind catches up with one larger chunk instead of
a chunk per step, so under load the front writes fewer chunks rather than falling further
behind. A stream's first event is handed over before the rest of its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
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
        """Hand each event to its stream, those of streams that had none yet first: their
        handlers then run first. At high concurrency a batch holds a chunk for each of dozens
        of streams under way, and a new stream's first chunk (what its TTFT waits for) would
        otherwise be written after a random share of them."""
        self._scheduled = False
        pending = self._pending
        batch = [pending.popleft() for _ in range(len(pending))]
        batch.sort(key=_heard)  # stable: each stream's events keep their order
        for events, item in batch:
            events.arrived(item)


def _heard(entry: tuple[TokenEvents, Event]) -> bool:
    return entry[0].heard


def inbox_of(state) -> Inbox:
    """The inbox of the front whose app state is `state`, made on its loop at first use."""
    inbox = getattr(state, "token_inbox", None)
    if inbox is None:
        inbox = state.token_inbox = Inbox(asyncio.get_running_loop())
    return inbox


class TokenEvents:
    """One request's events: put by the daemon's thread (`put`, through the inbox), taken by
    its handler on the loop (`take`). A wait costs a future, not a timer: the request's
    deadline has one timer, armed at its first wait and cancelled by `close`."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future | None = None
        self._deadline = math.inf  # the timer's
        self._timer: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future | None = None  # watched (its end wakes a wait)
        self.heard = False  # an event has arrived

    def put(self, item: Event) -> None:
        self._inbox.put(self, item)

    def arrived(self, item: Event) -> None:
        """On the loop: `item` is here."""
        self.heard = True
        self._items.append(item)
        self._wake()

    def _wake(self, *_) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, deadline: float, gone: asyncio.Future | None = None) -> Event | None:
        """Every event that came since the last take, as one: their tokens in order and the
        finish if it is among them (nothing after a finish is taken). Waits until `deadline`
        (time.monotonic(); inf: no limit) for one: TimeoutError past it; None if `gone` is
        done first."""
        while not self._items:
            if gone is not None and gone.done():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no event before the deadline")
            loop = asyncio.get_running_loop()
            self._watch(loop, deadline, left, gone)
            self._waiter = waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        tokens, finish = self._items.popleft()
        if self._items and finish is None:
            tokens = list(tokens)
            while self._items and finish is None:
                more, finish = self._items.popleft()
                tokens.extend(more)
        return tokens, finish

    def _watch(self, loop, deadline: float, left: float, gone: asyncio.Future | None) -> None:
        """A wait ends at `deadline` and when `gone` is done: the timer and the callback are
        set once, not per wait."""
        if deadline != self._deadline or (self._timer is None and not math.isinf(deadline)):
            self.close()  # a new deadline; or the timer fired a hair early, by the loop's clock
            self._deadline = deadline
            if not math.isinf(deadline):
                self._timer = loop.call_later(left, self._expire)
        if gone is not None and gone is not self._gone:
            self._gone = gone
            gone.add_done_callback(self._wake)

    def _expire(self) -> None:
        self._timer = None
        self._wake()

    def close(self) -> None:
        """The request is answered: its deadline's timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = math.inf
