"""The transfer thread's loop: posted calls run on it, it sleeps until woken or its step's
deadline, and its CPU time is readable."""

import os
import select
import threading
import time

from kvferry.transport.bell import Bell, drain
from kvferry.transport.loop import AgentLoop


def test_posted_calls_run_on_the_loop_and_its_cpu_time_is_counted():
    turns, ran_on = [0], []

    def step(now):
        turns[0] += 1
        sum(range(20000))  # some work per turn
        return 0.0 if turns[0] < 200 else 60.0  # 200 turns at once, then a long sleep

    loop = AgentLoop("kvferry-test-loop", lambda ready: None, step)
    assert loop.cpu_seconds() == 0.0
    loop.start()
    loop.post(lambda: ran_on.append(threading.current_thread().name))
    deadline = time.monotonic() + 10
    while (turns[0] < 200 or not ran_on) and time.monotonic() < deadline:
        time.sleep(0.01)
    used = loop.cpu_seconds()
    assert ran_on == ["kvferry-test-loop"]
    assert used > 0
    loop.stop()
    assert loop.cpu_seconds() >= used  # kept after the thread is gone


def test_an_idle_loop_sleeps_until_woken_or_its_deadline():
    woken = threading.Event()

    def step(now):
        return 0.2  # the owner's timer period

    loop = AgentLoop("kvferry-test-idle", lambda ready: None, step)
    loop.start()
    time.sleep(1.0)
    idle_turns = loop.turns
    assert idle_turns <= 1 / 0.2 + 2  # one turn per timer period (and the first), no spinning
    assert loop.timer_turns >= idle_turns - 2
    loop.post(woken.set)  # a posted call wakes it at once, long before its deadline
    assert woken.wait(5)
    loop.stop()


def test_calls_posted_without_waking_wait_for_one_turn_together():
    """An engine hands a chunk over before it launches a forward and its first token after:
    posted with wake=False, both run in the one turn its wake-up after the forward gives."""
    ran, both, stepped = [], threading.Event(), threading.Event()
    loop = AgentLoop("kvferry-test-quiet", lambda ready: None, lambda now: (stepped.set(), 60.0)[1])
    loop.start()
    assert stepped.wait(5)  # the first turn
    stepped.clear()
    loop.wake()
    assert stepped.wait(5)  # past this turn's look at the posted calls: it sleeps next
    turns = loop.turns
    loop.post(lambda: ran.append("chunk"), wake=False)
    loop.post(lambda: (ran.append("first token"), both.set()), wake=False)
    assert ran == [] and loop.turns == turns  # nothing woke the loop
    loop.wake()
    assert both.wait(5)
    assert ran == ["chunk", "first token"] and loop.turns == turns + 1
    loop.stop()


def test_a_bell_rings_its_own_pipe_once_per_clear_and_forwards_every_ring():
    bell, (other, forward) = Bell(), os.pipe()
    bell.forward_to(forward)
    for _ in range(3):
        bell.ring()
    assert os.read(bell.fileno(), 100) == b"x"  # coalesced until the owner clears it
    assert os.read(other, 100) == b"xxx"  # the other waiter cannot clear: every ring counts
    bell.clear()
    assert drain(bell.fileno())  # empty and open
    bell.ring()
    assert os.read(bell.fileno(), 100) == b"x"
    os.close(forward)
    assert not drain(other)  # every writer gone: the pipe reads as closed
    bell.close()
    os.close(other)


def test_a_ring_while_the_bell_is_cleared_never_leaves_it_mute(monkeypatch):
    """Another thread rings just as the waiter empties the pipe: whichever way that falls, a
    ring after clear() returns must wake the next wait."""
    from kvferry.transport import bell as bell_module

    bell = Bell()
    bell.ring()

    def drain_racing_a_ring(fd: int) -> bool:
        ringer = threading.Thread(target=bell.ring)
        ringer.start()
        ringer.join(0.5)  # it finishes, or waits for clear() to let go of the bell
        return drain(fd)

    monkeypatch.setattr(bell_module, "drain", drain_racing_a_ring)
    bell.clear()
    monkeypatch.setattr(bell_module, "drain", drain)
    bell.ring()
    readable, _, _ = select.select([bell.fileno()], [], [], 1.0)
    assert readable, "the bell stayed silent after a ring"
    bell.close()


def test_each_turn_counts_what_woke_it():
    """A watched descriptor's wakes count under its cause, a posted call's under the bell, a
    turn its step asked for at once under at_once, a deadline's under timer."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    asked = ["at once", "timer"]  # what the next turns' steps ask for, then a long sleep
    turned = threading.Event()

    def step(now):
        turned.set()
        return {"at once": 0.0, "timer": 0.05}.get(asked.pop(0) if asked else "", 60.0)

    def on_frames(ready):
        if read_fd in ready:
            drain(read_fd)

    loop = AgentLoop("kvferry-test-wakes", on_frames, step)
    loop.watch(read_fd, True, "data")
    loop.start()
    deadline = time.monotonic() + 10
    while asked or loop.turns < 3:  # the first turn, the one asked at once, the timer
        assert time.monotonic() < deadline
        time.sleep(0.01)
    settled = dict(loop.wakes)
    assert settled["at_once"] >= 2 and settled["timer"] >= 1  # (the first turn: at once too)
    turned.clear()
    os.write(write_fd, b"x")
    assert turned.wait(5)
    turned.clear()
    loop.post(lambda: None)
    assert turned.wait(5)
    woken = dict(loop.wakes)
    loop.stop()
    assert woken["data"] == settled["data"] + 1
    assert woken["bell"] == settled["bell"] + 1
    os.close(read_fd)
    os.close(write_fd)


def test_a_loop_with_a_sleeper_takes_a_turn_for_its_news_only():
    """A sleeper (the native data plane's) watches the loop's descriptors itself: its "data"
    answer is a turn woken by the data plane; a descriptor that stirred with nothing to read
    is slept through, not a turn; the bell still wakes it."""
    data_r, data_w = os.pipe()  # stands for the data plane's descriptor
    answers = ["fds", "data"]  # what the sleeper says, then it sleeps for real
    slept = []

    def sleeper(fds, timeout_s):
        slept.append(fds)
        if answers:
            return answers.pop(0), (), 0.0
        readable = select.select(fds, [], [], timeout_s)[0]
        return ("fds" if readable else "timer"), tuple(readable), 0.0

    steps, second = [], threading.Event()

    def step(now):
        steps.append(now)
        if len(steps) == 2:
            second.set()
        return 60.0

    loop = AgentLoop("kvferry-test-sleeper", lambda ready: None, step)
    loop.watch(data_r, True, "data")
    loop.sleep_with(sleeper, data_r, list)
    loop.start()
    assert second.wait(5)  # the first turn, then one more
    assert loop.wakes["data"] == 1  # the spurious "fds" cost no turn
    assert loop.turns == 2  # the first turn, then the data plane's
    assert all(data_r not in fds for fds in slept)  # the sleeper watches the data plane itself
    woken = threading.Event()
    loop.post(woken.set)
    assert woken.wait(5)
    assert loop.wakes["bell"] == 1 and loop.turns == 3
    loop.stop()
    os.close(data_r)
    os.close(data_w)
