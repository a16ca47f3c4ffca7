"""A request's tokens on their way from the daemon's thread to the HTTP front's loop: one wake
of the loop for a batch of puts, a handler that fell behind taking what piled up as one event,
and the waits' ends (a timeout, a client that left)."""

import asyncio
import threading
import time

import pytest

from kvferry.daemon.server.token_events import Inbox, TokenEvents


def test_what_piled_up_is_taken_as_one_event_up_to_the_finish():
    async def run():
        events = TokenEvents(Inbox(asyncio.get_running_loop()))
        for item in (([1], None), ([2, 3], None), ([4], "length")):
            events.put(item)
        return await events.take(time.monotonic() + 5.0)

    assert asyncio.run(run()) == ([1, 2, 3, 4], "length")


def test_puts_from_another_thread_wake_the_loop_once_per_batch():
    async def run():
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        streams = [TokenEvents(inbox) for _ in range(32)]
        wakes = 0
        deliver = inbox._deliver

        def counted():
            nonlocal wakes
            wakes += 1
            deliver()

        inbox._deliver = counted
        step = threading.Thread(target=lambda: [s.put(([7], None)) for s in streams])
        step.start()
        step.join()
        taken = [await s.take(time.monotonic() + 5.0) for s in streams]
        return taken, wakes

    taken, wakes = asyncio.run(run())
    assert taken == [([7], None)] * 32
    assert wakes == 1


def test_a_take_waits_for_the_next_event_and_times_out_without_one():
    async def run():
        loop = asyncio.get_running_loop()
        events = TokenEvents(Inbox(loop))
        later = threading.Timer(0.01, events.put, args=(([5], None),))
        later.start()
        first = await events.take(time.monotonic() + 30.0)
        with pytest.raises(TimeoutError):
            await events.take(time.monotonic() + 0.01)
        later.join()
        return first

    assert asyncio.run(run()) == ([5], None)


def test_a_take_ends_with_none_once_the_client_has_left():
    async def run():
        loop = asyncio.get_running_loop()
        events, gone = TokenEvents(Inbox(loop)), loop.create_future()
        loop.call_soon(gone.set_result, None)
        return await events.take(float("inf"), gone)

    assert asyncio.run(run()) is None


def test_a_streams_first_event_is_handed_over_before_those_of_streams_under_way():
    async def run():
        inbox = Inbox(asyncio.get_running_loop())
        old, new = TokenEvents(inbox), TokenEvents(inbox)
        old.put(([1], None))
        await old.take(time.monotonic() + 5.0)  # under way
        order = []
        for events, name in ((old, "old"), (new, "new")):
            arrived = events.arrived
            events.arrived = lambda item, arrived=arrived, name=name: (
                order.append((name, item)),
                arrived(item),
            )
        old.put(([2], None))
        new.put(([10], None))
        new.put(([11], None))
        old.put(([3], "length"))
        return order, await new.take(time.monotonic() + 5.0), await old.take(time.monotonic() + 5.0)

    order, new_taken, old_taken = asyncio.run(run())
    assert order == [
        ("new", ([10], None)),
        ("new", ([11], None)),
        ("old", ([2], None)),
        ("old", ([3], "length")),
    ]
    assert new_taken == ([10, 11], None) and old_taken == ([2, 3], "length")
