"""The fuzzer: its frame makers cover every family, and a real deployment (prefill TP2 ->
decode TP1, CPU) survives a few thousand hostile frames per socket with its completions,
health, processes, fds, threads and memory intact."""

import pytest

from kvferry.daemon.cli.fuzz.frames import FAMILIES, SOCKET_KINDS, FrameMaker
from kvferry.daemon.cli.fuzz.http_requests import HTTP_FAMILIES, HttpMaker
from kvferry.daemon.cli.fuzz.report import table
from kvferry.daemon.cli.fuzz.run import FuzzSpec, run_fuzz
from kvferry.daemon.cli.fuzz.values import Learned
from kvferry.daemon.server.config import load
from kvferry.transport.messages import Codec, WireError
from support.cluster import decode, prefill, running, write

TARGETED = {
    "bootstrap": {"tiny-temperature", "big-seed", "forged-register-rank", "prompt-flood"},
    "prefill-control": {
        "invalid-register-room",
        "garbage-ucx-address",
        "huge-tp-size",
        "unknown-room-abort",
    },
    "decode-control": {"unknown-room-abort", "unknown-room-done", "unknown-room-accept"},
}


@pytest.mark.parametrize("kind", SOCKET_KINDS)
def test_frame_maker_covers_every_family(kind):
    maker = FrameMaker(kind, seed=3, learned=Learned(), max_message_bytes=32 << 20)
    frames = [maker.next() for _ in range(3000)]
    families = {frame.family.split(":")[0] for frame in frames}
    targeted = {frame.family.split(":")[1] for frame in frames if ":" in frame.family}
    assert families == set(FAMILIES)
    assert targeted == TARGETED[kind]
    assert {frame.identity for frame in frames} == {"default", "foreign", "distinct", "garbage"}
    assert max(sum(map(len, frame.parts)) for frame in frames) <= 32 << 20
    decoded = [_decodes(frame.parts) for frame in frames]
    assert any(decoded) and not all(decoded)  # valid messages and refused frames both


def test_same_seed_same_families():
    makers = [FrameMaker("prefill-control", 7, Learned(), 1 << 24) for _ in range(2)]
    runs = [[(f.family, f.identity) for f in (m.next() for _ in range(500))] for m in makers]
    assert runs[0] == runs[1]


def test_http_maker_covers_every_family():
    maker = HttpMaker(seed=1, vocab=258, host="127.0.0.1:1")
    families = {maker.next().family.split(":")[0] for _ in range(2000)}
    assert families == set(HTTP_FAMILIES)


def test_deployment_survives_fuzz(tmp_path):
    p = prefill("prefill-0", tp=2)
    path = write(tmp_path, [p, decode("decode-0", [p])])
    with running(path):
        result = run_fuzz(load(path), FuzzSpec(frames=2000, seed=1, http_timeout_s=0.1))
        print(table(result))
        assert not result.problems, "\n".join(result.problems)
        assert {run.kind for run in result.sockets} == {
            "bootstrap",
            "prefill-control",
            "decode-control",
            "http",
        }
        assert all(process.after.alive for process in result.processes)
        assert len(result.processes) == 5  # two daemons, three ranks


def _decodes(parts: list[bytes]) -> bool:
    if len(parts) != 1:
        return False
    try:
        Codec().decode(parts[0])
    except WireError:
        return False
    return True
