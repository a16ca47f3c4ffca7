"""The ranks' reports read on an event loop (`RankReports`): in order, on the loop's thread; a
message larger than the pipe holds read whole, and the daemon's own commands on the same pipe
sent whole, though the loop watches it; a Fatal report ends the reading and wakes whoever waits
on `fatal_fd`; a pipe closed by its rank stops being watched instead of reading as ready
forever; `unwatch` gives the pipes back."""

import asyncio
import multiprocessing
import threading
import time
from multiprocessing.connection import wait

import pytest
import uvloop

from kvferry.daemon.server import protocol
from kvferry.daemon.server.rank_reports import RankFailed, RankReports


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def on_loop(loop, call):
    """`call()` run on `loop`, its answer."""
    return asyncio.run_coroutine_threadsafe(_call(call), loop).result(5)


async def _call(call):
    return call()


async def _turns(n):
    for _ in range(n):
        await asyncio.sleep(0)


def turns(loop, n=3):
    """Let `loop` go round `n` times: a reader with something to read has read it by then."""
    for _ in range(n):
        on_loop(loop, lambda: None)


def watched(loop, handle, *conns):
    """`RankReports` of `conns` watched on `loop`, the watch begun."""
    reports = RankReports(list(conns))
    reports.watch(loop, handle)
    turns(loop, 1)
    return reports


def until(done, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.005)
    return done()


def test_reports_are_handed_over_on_the_loop_in_order(loop):
    ours, rank = multiprocessing.Pipe()
    taken = []
    reports = watched(loop, lambda message: taken.append((message, threading.get_ident())), ours)
    for n in range(5):
        rank.send(("step", n))
    assert until(lambda: len(taken) == 5)
    loop_thread = on_loop(loop, threading.get_ident)
    assert taken == [(("step", n), loop_thread) for n in range(5)]
    reports.unwatch()


def test_messages_larger_than_the_pipe_cross_whole_both_ways(loop):
    ours, rank = multiprocessing.Pipe()
    taken = []
    reports = watched(loop, taken.append, ours)
    big = bytes(range(256)) * 32768  # 8 MiB: many times what a socket pair buffers
    # the rank's report arrives in pieces while the loop reads it
    sender = threading.Thread(target=rank.send, args=(("report", big),))
    sender.start()
    # the daemon's command to the rank, on the same pipe, from another thread meanwhile
    received = []
    reader = threading.Thread(target=lambda: received.append(rank.recv()))
    reader.start()
    ours.send(("command", big))
    sender.join(10)
    reader.join(10)
    assert until(lambda: len(taken) == 1)
    assert taken == [("report", big)] and received == [("command", big)]
    assert reports.fatal is None
    reports.unwatch()


def test_a_fatal_report_stops_the_reading_and_wakes_the_daemons_thread(loop):
    ours, rank = multiprocessing.Pipe()
    taken = []
    reports = watched(loop, taken.append, ours)
    rank.send(("step", 0))
    rank.send(protocol.Fatal(0, "rank 0: the engine failed: boom"))
    rank.send(("step", 1))  # after the Fatal: nobody reads it
    assert wait([reports.fatal_fd], 5.0) == [reports.fatal_fd]
    assert reports.fatal == "rank 0: the engine failed: boom"
    turns(loop)
    assert taken == [("step", 0)]
    assert ours.recv() == ("step", 1)  # still in the pipe
    reports.unwatch()


def test_a_report_that_cannot_be_read_is_a_rank_failure(loop):
    ours, rank = multiprocessing.Pipe()
    reports = watched(loop, lambda message: None, ours)
    rank.send_bytes(b"\x1d not a pickle")
    assert wait([reports.fatal_fd], 5.0) == [reports.fatal_fd]
    assert reports.fatal.startswith("a rank's report could not be read: UnpicklingError")
    reports.unwatch()


def test_a_pipe_its_rank_closed_is_no_longer_watched(loop):
    ours, rank = multiprocessing.Pipe()
    other_ours, other_rank = multiprocessing.Pipe()
    looks = Looks(ours)
    taken = []
    reports = watched(loop, taken.append, looks, other_ours)
    rank.send("last words")
    rank.close()
    assert until(lambda: taken == ["last words"])
    turns(loop)
    looked = looks.count
    # a closed pipe reads as ready forever: left watched, the loop would look at it every turn
    turns(loop, 20)
    assert looks.count == looked
    other_rank.send("still here")  # the other rank's pipe is still read
    assert until(lambda: taken == ["last words", "still here"])
    assert reports.fatal is None
    reports.unwatch()


class Looks:
    """A pipe end that counts how often it is asked whether it holds a report."""

    def __init__(self, conn) -> None:
        self.conn, self.count = conn, 0

    def poll(self) -> bool:
        self.count += 1
        return self.conn.poll()

    def recv(self):
        return self.conn.recv()

    def fileno(self) -> int:
        return self.conn.fileno()


def test_unwatch_gives_the_pipes_back(loop):
    ours, rank = multiprocessing.Pipe()
    on_loop_taken, here = [], []
    reports = watched(loop, on_loop_taken.append, ours)
    rank.send("before")
    assert until(lambda: on_loop_taken == ["before"])
    reports.unwatch()
    rank.send("after")
    turns(loop)
    assert on_loop_taken == ["before"]
    assert reports.read(ours, here.append) and here == ["after"]
    rank.send(protocol.Fatal(0, "gone"))
    with pytest.raises(RankFailed, match="gone"):
        reports.read(ours, here.append)


def test_unwatch_before_the_loop_ran_leaves_nothing_watching():
    loop = uvloop.new_event_loop()
    ours, rank = multiprocessing.Pipe()
    taken = []
    reports = RankReports([ours])
    reports.watch(loop, taken.append)
    reports.unwatch()  # the loop does not run yet: returns at once
    rank.send("unseen")
    loop.run_until_complete(_turns(3))  # the watch's call runs now, and adds nothing
    assert taken == []  # a report waits: a reader would have taken it
    loop.close()
