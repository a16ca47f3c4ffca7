"""daemon/server/heap.py: the start-up heap frozen out of the collector, and each pass timed."""

import gc
import threading

import pytest

from kvferry.daemon.server.heap import KEPT, GCPauses, freeze


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()  # the permanent generation back into the collector's reach for other tests


def test_each_pass_is_timed_by_generation_and_taken_once():
    pauses = GCPauses().start()
    try:
        gc.collect(0)
        gc.collect(2)
        taken = pauses.take()
        assert [generation for generation, _ in taken][-2:] == [0, 2]
        assert all(seconds >= 0 for _, seconds in taken)
        assert pauses.take() == []  # handed over once
    finally:
        pauses.stop()
    gc.collect(2)
    assert pauses.take() == []  # stopped: no longer timed


def test_passes_not_taken_are_bounded():
    pauses = GCPauses().start()
    try:
        for _ in range(KEPT + 10):
            gc.collect(0)
        assert len(pauses.take()) == KEPT
    finally:
        pauses.stop()


def test_takes_from_several_threads_share_the_passes_without_error():
    pauses = GCPauses().start()
    try:
        for _ in range(200):
            gc.collect(0)
        got, errors = [], []

        def take():
            try:
                got.extend(pauses.take())
            except Exception as exc:  # the check: no IndexError when another thread took some
                errors.append(exc)

        threads = [threading.Thread(target=take) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert len(got) >= 200  # each pass once, whoever took it (more came meanwhile)
    finally:
        pauses.stop()


def test_freeze_moves_what_is_alive_out_of_reach_then_times_passes(unfrozen):
    kept = [object() for _ in range(1000)]
    pauses = GCPauses()
    try:
        frozen = freeze("test", pauses)
        assert frozen == gc.get_freeze_count() >= len(kept)
        assert not any(o is kept for o in gc.get_objects(2))  # none of it is walked any more
        gc.collect(2)
        assert [generation for generation, _ in pauses.take()][-1:] == [2]
    finally:
        pauses.stop()
