"""A loop turn takes in the completions its own posts left (a small send completes inside its
post, and no event on the data plane's descriptor tells of it): it progresses and steps
again, a bounded number of times, rather than leave them to a turn of its own."""

from kvferry.transport import core as core_module
from kvferry.transport.dataplane import DataOp
from kvferry.transport.loopback import LoopbackDataPlane
from kvferry.transport.room import KVPoll
from support.transfer_sim import (
    Deployment,
    count_calls,
    decode_matches,
    small_config,
    wait_all,
)


class Reaped(DataOp):
    """A send that completed inside its post: done once a progress has reaped it."""

    def __init__(self, op: DataOp) -> None:
        self.op, self.reaped = op, False

    def done(self) -> bool:
        return self.reaped

    def error(self):
        return self.op.error()


class InlinePlane(LoopbackDataPlane):
    """Sends complete inside their post, as UCX's small sends do: the completion waits for
    the next progress to be reaped, and arming the plane fails until then."""

    pending_forever = False  # arming always finds events pending

    def __init__(self):
        super().__init__()
        self._unreaped: list[Reaped] = []

    def _send(self, endpoint, buffer, tag, group):
        op = Reaped(super()._send(endpoint, buffer, tag, group))
        self._unreaped.append(op)
        return op

    def _progress(self):
        super()._progress()
        for op in self._unreaped:
            op.reaped = True
        self._unreaped.clear()

    def arm(self) -> bool:
        return not (self._unreaped or self.pending_forever)


def run_transfers(dep, count=2):
    for seed in range(1, count + 1):
        req, senders, receivers = dep.run(num_tokens=40, seed=seed)
        states = wait_all(senders + receivers)
        assert states == [KVPoll.Success] * len(states), [str(h.failure) for h in receivers]
        assert decode_matches(dep.decode, req)


def test_a_turn_takes_in_the_completions_of_its_own_sends():
    config = small_config(heartbeat_interval_s=60.0, heartbeat_timeout_s=180.0)
    dep = Deployment(4, 2, 1, config=config, data_plane=InlinePlane)
    try:
        prefill = dep.prefill.agents[0].core
        steps = count_calls(prefill, "_step")  # the owner's steps
        turns_before = prefill.loop.turns
        run_transfers(dep)
        # some turn stepped again after its sends completed inside their posts
        assert steps[0] > prefill.loop.turns - turns_before
    finally:
        dep.close()


def test_a_turn_steps_at_most_a_bounded_number_of_times(monkeypatch):
    monkeypatch.setattr(InlinePlane, "pending_forever", True)
    dep = Deployment(4, 1, 1, data_plane=InlinePlane)
    try:
        prefill = dep.prefill.agents[0].core
        steps = count_calls(prefill, "_step")  # the owner's steps
        turns_before = prefill.loop.turns
        run_transfers(dep, count=1)  # the loop goes on turning: every transfer still ends
        turns = prefill.loop.turns - turns_before + 1  # + the turn running as counting began
        assert steps[0] <= (1 + core_module.EXTRA_PASSES) * turns
    finally:
        dep.close()
