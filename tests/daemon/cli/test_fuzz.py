"""The fuzzer: its frame makers cover every family, and a real deployment (prefill TP2 ->
decode TP1, CPU) survives a few thousand hostile frames per socket with its completions,
health, processes, fds, threads and memory intact."""

import pytest
import yaml

from kvferry.daemon.cli.fuzz.frames import FAMILIES, SOCKET_KINDS, FrameMaker
from kvferry.daemon.cli.fuzz.http_requests import HTTP_FAMILIES, HttpMaker
from kvferry.daemon.cli.fuzz.report import table
from kvferry.daemon.cli.fuzz.run import FuzzSpec, run_fuzz
from kvferry.daemon.cli.fuzz.values import Learned
from kvferry.daemon.server.config import load
from kvferry.transport.messages import Codec, WireError
from ports import free_port
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


def test_router_port_is_fuzzed_too(tmp_path):
    p = prefill("prefill-0")
    d = decode("decode-0", [p])
    path = write(tmp_path, [p, d])
    raw = yaml.safe_load(path.read_text())
    target = f"http://127.0.0.1:{d['http_port']}"
    raw["routers"] = [{"name": "router-0", "http_port": free_port(), "targets": [target]}]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with running(path):
        spec = FuzzSpec(frames=600, seed=2, http_timeout_s=0.1, kinds=("http",))
        result = run_fuzz(load(path), spec)
        assert not result.problems, "\n".join(result.problems)
        assert {run.name for run in result.sockets} == {
            "prefill-0 http",
            "decode-0 http",
            "router-0 http",
        }
        assert result.health["router-0"] == "ok"
        router = next(process for process in result.processes if process.name == "router-0")
        assert router.after.alive and router.after.fds > 0
