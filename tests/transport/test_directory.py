"""The decode side's cache of bootstrap answers: kept until a rank it names is lost, and never
filled by an answer naming a rank lost while its lookup ran."""

import queue
import threading

import pytest
import zmq

from kvferry.transport.directory import PrefillDirectory
from kvferry.transport.messages import RankInfo
from support.transfer_sim import layout_for, small_config

BOOTSTRAP = "tcp://127.0.0.1:7000"
RANK = RankInfo(layout_for(4, 1, 0), b"ucx", "tcp://127.0.0.1:7001")


class Harness:
    """A directory whose lookups wait for the test to release them and answer [RANK]; its
    posted callbacks run when the test says so (as the transfer thread would run them)."""

    def __init__(self) -> None:
        self.posted: queue.Queue = queue.Queue()
        self.gate = threading.Event()
        self.lookups = 0
        self.answers: list = []
        self.directory = PrefillDirectory(zmq.Context.instance(), small_config(), self.posted.put)
        self.directory._lookup = self._lookup

    def _lookup(self, bootstrap):
        self.lookups += 1
        assert self.gate.wait(10), "the test never released the lookup"
        return [RANK]

    def resolve(self, waiter):
        self.directory.resolve(BOOTSTRAP, waiter, lambda *answer: self.answers.append(answer))

    def finish_lookup(self):
        self.gate.set()
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
