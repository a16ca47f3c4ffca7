"""The decode daemon's choice of prefill: least loaded first, ties in turn, none that failed a
hand-off within the back-off window, and membership that follows what a name resolves to. The
bootstrap servers' answers are stubbed (this module's unit tests); the daemons' own tests run
the real ones."""

import pytest

from kvferry.daemon.server import prefill_probe
from kvferry.daemon.server.metrics import Metrics
from kvferry.daemon.server.prefill_probe import PrefillProbe
from kvferry.transport.directory import incarnation
from kvferry.transport.messages import Peers, PrefillLoad, RankInfo
from kvferry.transport.resolve import HOSTS_FILE_ENV, resolve
from support.cluster import wait_for
from support.transfer_sim import layout_for

A, B = "tcp://10.0.0.1:7000", "tcp://10.0.0.2:7000"


@pytest.fixture
def answers(monkeypatch):
    """address -> what its bootstrap server answers (a PrefillLoad, a whole Peers answer, or an
    exception raised)."""
    table = {}

    def answer(context, codec, address, message, timeout):
        reply = table[address]
        if isinstance(reply, Exception):
            raise reply
        return reply if isinstance(reply, Peers) else Peers([], reply)

    monkeypatch.setattr(prefill_probe, "control_request", answer)
    return table


def started(specs, resolve=lambda spec: [spec], probing=False) -> PrefillProbe:
    """A probe after its first round; still probing only if `probing` (no answer then resets
    what the picks counted while a test looks)."""
    probe = PrefillProbe(specs, None, None, Metrics("decode", "test"), resolve)
    probe.start()
    wait_for(lambda: all(s["last_seen"] or s["last_error"] for s in probe.states()), "probes")
    if not probing:
        probe.stop()
    return probe


def test_the_least_loaded_prefill_is_picked_until_it_is_not(answers):
    answers.update({A: PrefillLoad(prompts=2, prompt_tokens=1000), B: PrefillLoad()})
    probe = started([A, B])
    try:
        assert [probe.pick(600), probe.pick(600)] == [B, B]
        assert probe.pick(600) == A  # B has 1200 tokens handed since its answer
    finally:
        probe.stop()


def test_equally_loaded_prefills_take_turns(answers):
    answers.update({A: PrefillLoad(), B: PrefillLoad()})
    probe = started([A, B])
    try:
        picks = [probe.pick() for _ in range(4)]
        assert picks.count(A) == picks.count(B) == 2 and picks[0] != picks[1]
    finally:
        probe.stop()


def test_a_prefill_that_failed_a_hand_off_backs_off(answers):
    answers.update({A: PrefillLoad(prompt_tokens=10**6), B: PrefillLoad()})
    probe = started([A, B])
    try:
        probe.failed(B, "refused: stopping")
        assert {probe.pick() for _ in range(3)} == {A}
        (state,) = [s for s in probe.states() if s["address"] == B]
        assert state["backing_off"] and state["last_error"] == "refused: stopping"
        probe.failed(A, "no reply")
        assert probe.pick() is None and not probe.any_usable()
    finally:
        probe.stop()


def test_an_unreachable_prefill_is_skipped_and_named(answers):
    answers.update({A: TimeoutError("no reply within 2 s"), B: PrefillLoad()})
    probe = started([A, B], probing=True)
    # one probe missed is not enough (a saturated host may miss one): two in a row are
    wait_for(lambda: [s["reachable"] for s in probe.states()] == [False, True], "A unreachable")
    probe.stop()
    try:
        assert {probe.pick() for _ in range(3)} == {B}
        assert "no reply within 2 s" in probe.why_none()
    finally:
        probe.stop()


def test_membership_follows_what_the_name_resolves_to(answers):
    answers.update({A: PrefillLoad(), B: PrefillLoad()})
    name, stands_for = "tcp://prefills.svc:7000", [[A]]
    probe = started([name], resolve=lambda spec: list(stands_for[-1]), probing=True)
    try:
        assert {probe.pick() for _ in range(3)} == {A}
        stands_for.append([A, B])
        probe.failed("tcp://elsewhere:1", "looks again")  # a failure: names are looked up now
        wait_for(lambda: {s["address"] for s in probe.states()} == {A, B}, "B to join")
        stands_for.append([B])
        probe.failed(A, "gone")
        wait_for(lambda: [s["address"] for s in probe.states()] == [B], "A to be retired")
        assert probe.pick() == B
    finally:
        probe.stop()


def test_a_name_that_resolves_to_nothing_keeps_its_last_addresses(answers):
    answers.update({A: PrefillLoad()})
    results = [[A]]

    def flaky(spec):
        if not results:
            raise OSError("prefills.svc: no such host")
        return results.pop()

    probe = started(["tcp://prefills.svc:7000"], resolve=flaky, probing=True)
    try:
        probe.failed("tcp://elsewhere:1", "looks again")
        wait_for(lambda: probe.pick() == A, "the last addresses kept")
    finally:
        probe.stop()


def test_a_new_incarnation_is_told_before_the_state_shows_it(answers, monkeypatch):
    monkeypatch.setattr(prefill_probe, "PROBE_INTERVAL_S", 0.02)
    ranks = [RankInfo(layout_for(4, 1, 0), b"ucx", "tcp://10.0.0.1:7001")]
    restarted = [RankInfo(layout_for(4, 1, 0), b"ucx-2", "tcp://10.0.0.1:7002")]
    old, new = incarnation(ranks), incarnation(restarted)
    told = []  # (address, incarnation, what /status showed when told)

    def tell(address, seen):
        told.append((address, seen, probe.states()[0]["incarnation"]))

    answers[A] = Peers(ranks)
    probe = PrefillProbe([A], None, None, Metrics("decode", "test"), on_incarnation=tell)
    probe.start()
    try:
        wait_for(lambda: told, "the first answer's incarnation")
        answers[A] = TimeoutError("restarting")
        wait_for(lambda: len(told) == 2, "the miss")
        answers[A] = Peers(restarted)
        wait_for(lambda: probe.states()[0]["incarnation"] == new, "the new incarnation")
    finally:
        probe.stop()
    assert told == [(A, old, None), (A, None, old), (A, new, None)]  # once per change


def test_resolve_reads_the_hosts_file_before_dns(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("# fleet\n127.0.0.2 prefills.test\n127.0.0.1 other prefills.test\n")
    monkeypatch.setenv(HOSTS_FILE_ENV, str(hosts))
    assert resolve("tcp://prefills.test:17100") == [
        "tcp://127.0.0.1:17100",
        "tcp://127.0.0.2:17100",
    ]
    assert resolve("tcp://10.1.2.3:5") == ["tcp://10.1.2.3:5"]
    assert resolve("tcp://[::1]:5") == ["tcp://[::1]:5"]
    assert resolve("tcp://localhost:5") == ["tcp://127.0.0.1:5"]
    with pytest.raises(OSError, match=r"no-such-host\.invalid"):
        resolve("tcp://no-such-host.invalid:5")
