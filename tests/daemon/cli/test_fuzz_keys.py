"""The fuzzer against a deployment with CURVE keys: each ZeroMQ socket is fuzzed by a stranger
without the secret key (no frame may be read: the bad-frame counters stay put) and by a member
holding it (the usual absurd frames); the deployment survives both."""

from kvferry.daemon.cli.fuzz.report import table
from kvferry.daemon.cli.fuzz.run import FuzzSpec, run_fuzz
from kvferry.daemon.server.config import load
from kvferry.transport import curve
from support.cluster import decode, prefill, running, write


def test_keyed_deployment_survives_strangers_and_members(tmp_path):
    security = {"curve_key_file": str(curve.generate(tmp_path / "keys"))}
    p = prefill("prefill-0", security=security)
    path = write(tmp_path, [p, decode("decode-0", [p], security=security)])
    with running(path):
        spec = FuzzSpec(
            frames=300, seed=2, kinds=("bootstrap", "prefill-control", "decode-control")
        )
        result = run_fuzz(load(path), spec)
        print(table(result))
        assert not result.problems, "\n".join(result.problems)
        modes = {(run.kind, run.mode) for run in result.sockets}
        assert modes == {
            (kind, mode)
            for kind in ("bootstrap", "prefill-control", "decode-control")
            for mode in ("stranger", "member")
        }
        member_bad = sum(after - before for before, after in result.bad_frames.values())
        assert member_bad > 0  # members' frames are read (and refused): the check can fail
        assert all(run.frames == 300 for run in result.sockets)
