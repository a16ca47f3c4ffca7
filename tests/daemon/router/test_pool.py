"""The router's target pool and targets, as plain Python: who is picked, who is out, who
joins and who retires."""

import pytest

from kvferry.daemon.router.pool import TargetPool
from kvferry.daemon.router.targets import Load
from support.router_sim import status

NAME = "http://decodes.test:8000"
A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


def pool_of(*urls: str, origin: str = NAME) -> TargetPool:
    pool = TargetPool()
    pool.update(origin, list(urls))
    for target in pool.targets():
        target.observed(Load.of_status(status(), own=0))  # idle, 100 free pages
    return pool


def test_the_least_loaded_target_is_picked_not_the_next_in_turn():
    pool = pool_of(A, B)
    pool.get(A).observed(Load.of_status(status(in_flight=5), own=0))
    picked = [pool.pick(0.0, set()).url for _ in range(5)]
    assert picked == [B] * 5  # B reaches A's 5 in flight only with the fifth
    assert pool.pick(0.0, set()).url in (A, B)


def test_in_flight_ties_go_to_the_most_free_pages_then_the_least_recent():
    pool = pool_of(A, B, C)
    pool.get(C).observed(Load.of_status(status(free_pages=500), own=0))
    first = pool.pick(0.0, set())
    assert first.url == C
    pool.release(first)
    pool.get(C).observed(Load.of_status(status(free_pages=100), own=0))
    for _ in range(3):
        pool.release(pool.pick(0.0, set()))
    # sequential requests over equal targets: each is picked in turn
    assert [t.picked for t in pool.targets()] == [2, 3, 4]


def test_the_daemon_count_is_moved_by_what_this_router_started_since():
    pool = pool_of(A)
    target = pool.get(A)
    for _ in range(3):
        pool.pick(0.0, set())
    target.observed(Load.of_status(status(in_flight=10), own=3))  # 7 from elsewhere
    pool.release(target)
    assert target.estimated_in_flight == 9


def test_a_failed_target_backs_off_and_needs_its_health_again():
    pool = pool_of(A, B)
    pool.get(A).failed(now=10.0, backoff_s=5.0, why="answered 503")
    assert [pool.pick(11.0, set()).url for _ in range(2)] == [B, B]
    assert pool.get(A).state(11.0) == "backoff"
    assert pool.pick(16.0, {B}) is None  # the window is over, but no /health since
    pool.get(A).observed(Load.of_status(status(), own=0))
    assert pool.pick(16.0, {B}).url == A


def test_excluded_and_unusable_targets_are_named():
    pool = pool_of(A, B)
    pool.get(B).down("stopping")
    assert pool.pick(0.0, {A}) is None
    assert pool.why_none(0.0, {A}) == f"{B} (stopping)"
    assert pool.why_none(0.0, {A, B}) == "every target was tried"
    assert "none is known" in TargetPool().why_none(0.0, set())


def test_a_name_gains_and_loses_addresses():
    pool = pool_of(A)
    assert pool.update(NAME, [A, B]) == ([B], [])
    busy = pool.pick(0.0, {B})
    assert busy.url == A
    assert pool.update(NAME, [B]) == ([], [A])
    assert busy.retiring and busy.state(0.0) == "retiring"
    assert pool.pick(0.0, {B}) is None  # a retiring target gets no new request
    pool.release(busy)  # its last request ends: it leaves
    assert [t.url for t in pool.targets()] == [B]


def test_an_address_stays_while_another_configured_target_stands_for_it():
    pool = pool_of(A, B)
    pool.update(A, [A])  # A is also configured literally
    assert pool.update(NAME, [B]) == ([], [])
    assert pool.get(A).origins == {A}
    assert pool.update(NAME, [A, B]) == ([], [])


@pytest.mark.parametrize(
    ("body", "missing"),
    [({}, "requests"), ({"requests": {"in_flight": 1}}, "ranks"), ({"requests": 3}, "")],
)
def test_a_status_that_is_not_a_decode_daemons_is_refused(body, missing):
    with pytest.raises(ValueError, match=f"/status without .*{missing}"):
        Load.of_status(body, own=0)
