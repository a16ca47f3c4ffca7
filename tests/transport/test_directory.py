"""The decode side's cache of bootstrap answers: kept until a rank it names is lost or the daemon
says the group is another incarnation, and never filled by an answer naming a rank lost while its
lookup ran, or by one of an incarnation other than the one expected."""

import queue
import threading

import pytest
import zmq

from kvferry.transport.directory import PrefillDirectory, incarnation
from kvferry.transport.messages import RankInfo
from support.transfer_sim import layout_for, small_config

BOOTSTRAP = "tcp://127.0.0.1:7000"
RANK = RankInfo(layout_for(4, 1, 0), b"ucx", "tcp://127.0.0.1:7001")
# the same group restarted on the same bootstrap address: new worker and control addresses
RESTARTED = RankInfo(layout_for(4, 1, 0), b"ucx-2", "tcp://127.0.0.1:7002")
OLD, NEW = incarnation([RANK]), incarnation([RESTARTED])


class Harness:
    """A directory whose lookups wait for the test to release them and answer `ranks` ([RANK]
    at first); its posted callbacks run when the test says so (as the transfer thread would
    run them)."""

    def __init__(self) -> None:
        self.posted: queue.Queue = queue.Queue()
        self.gate = threading.Event()
        self.lookups = 0
        self.ranks = [RANK]
        self.answers: list = []
        self.directory = PrefillDirectory(zmq.Context.instance(), small_config(), self.posted.put)
        self.directory._lookup = self._lookup

    def _lookup(self, bootstrap):
        self.lookups += 1
        assert self.gate.wait(10), "the test never released the lookup"
        return self.ranks

    def resolve(self, waiter):
        self.directory.resolve(BOOTSTRAP, waiter, lambda *answer: self.answers.append(answer))

    def finish_lookup(self):
        self.gate.set()
        self.posted.get(timeout=10)()

    def expect(self, seen):
        """The daemon's news, run on the (test's) transfer thread."""
        self.directory.expect(BOOTSTRAP, seen)
        self.posted.get(timeout=10)()


@pytest.fixture
def harness():
    made = Harness()
    yield made
    made.gate.set()
    made.directory.close()


def test_an_answer_is_cached_until_a_rank_it_names_is_lost(harness):
    harness.resolve("a")
    harness.finish_lookup()
    harness.resolve("b")  # answered from the cache, at once
    assert harness.answers == [(["a"], [RANK], None), (["b"], [RANK], None)]
    assert harness.lookups == 1
    harness.directory.forget(RANK.control_address)
    harness.resolve("c")
    harness.finish_lookup()
    assert harness.lookups == 2 and harness.answers[-1] == (["c"], [RANK], None)


def test_an_answer_naming_a_rank_lost_during_its_lookup_is_not_cached(harness):
    harness.resolve("a")
    harness.resolve("b")  # waits for the same lookup
    harness.directory.forget(RANK.control_address)  # while the lookup runs
    harness.finish_lookup()
    assert harness.answers == [(["a", "b"], [RANK], None)]  # its waiters still get it
    harness.gate.clear()
    harness.resolve("c")  # not from the cache: a fresh lookup
    assert len(harness.answers) == 1
    harness.finish_lookup()
    assert harness.lookups == 2 and harness.answers[-1] == (["c"], [RANK], None)
    harness.resolve("d")  # that one was cached
    assert harness.lookups == 2 and harness.answers[-1] == (["d"], [RANK], None)


def test_losing_a_rank_of_another_group_during_a_lookup_does_not_stop_caching(harness):
    harness.resolve("a")
    harness.directory.forget("tcp://127.0.0.1:7999")
    harness.finish_lookup()
    harness.resolve("b")
    assert harness.lookups == 1 and harness.answers[-1] == (["b"], [RANK], None)


def test_a_new_incarnation_drops_the_old_answer_and_keeps_its_own(harness):
    harness.resolve("a")
    harness.finish_lookup()
    harness.expect(OLD)  # what is cached already: kept
    harness.resolve("b")
    assert harness.lookups == 1
    harness.gate.clear()
    harness.ranks = [RESTARTED]
    harness.expect(NEW)  # restarted while this rank had no room there: nothing was lost
    harness.resolve("c")
    assert len(harness.answers) == 2  # not the old ranks: it waits for a lookup
    harness.finish_lookup()
    harness.resolve("d")
    assert harness.answers[-2:] == [(["c"], [RESTARTED], None), (["d"], [RESTARTED], None)]
    assert harness.lookups == 2


def test_an_answer_of_another_incarnation_than_expected_is_not_cached(harness):
    harness.expect(NEW)
    harness.resolve("a")  # the bootstrap server still answers for the old ranks
    harness.finish_lookup()
    assert harness.answers == [(["a"], [RANK], None)]
    harness.gate.clear()
    harness.ranks = [RESTARTED]
    harness.resolve("b")
    harness.finish_lookup()
    harness.resolve("c")
    assert harness.lookups == 2 and harness.answers[-1] == (["c"], [RESTARTED], None)


def test_a_prefill_lost_during_a_lookup_leaves_its_answer_uncached(harness):
    harness.resolve("a")
    harness.expect(None)  # its probe went unanswered while the lookup ran
    harness.finish_lookup()
    harness.gate.clear()
    harness.resolve("b")
    assert len(harness.answers) == 1  # not from the cache
    harness.ranks = [RESTARTED]
    harness.expect(NEW)  # while that second lookup runs: its answer is the one expected
    harness.finish_lookup()
    harness.resolve("c")
    assert harness.lookups == 2 and harness.answers[-1] == (["c"], [RESTARTED], None)
