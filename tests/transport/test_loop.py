"""The transfer thread's loop: posted calls run on it, and its CPU time is readable."""

import threading
import time

from kvferry.transport.loop import AgentLoop


def test_posted_calls_run_on_the_loop_and_its_cpu_time_is_counted():
    turns, ran_on = [0], []

    def step(now):
        turns[0] += 1
        sum(range(20000))  # some work per turn
        return turns[0] < 200  # busy for 200 turns, then idle

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
