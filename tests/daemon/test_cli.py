"""The `kvferry` CLI, its HTTP client and the deployment launcher, against stub daemons."""

import json
import os
import signal
import socket
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kvferry.daemon import cli as cli_module
from kvferry.daemon import launcher as launcher_module
from kvferry.daemon.cli import main
from kvferry.daemon.client import (
    ClientError,
    CompletionRequest,
    DaemonClient,
    RequestTimeout,
    ServerError,
)
from kvferry.daemon.config import ConfigError, load, parse
from kvferry.daemon.launcher import Launcher, LaunchError

LOCAL_YAML = Path(__file__).parents[2] / "deploy" / "local.yaml"

STATUS = {
    "role": "decode",
    "name": "decode-0",
    "state": "serving",
    "tp": 1,
    "requests": {"waiting": 1, "arriving": 0, "running": 2},
    "ranks": [
        {
            "rank": 0,
            "rooms": {"Bootstrapping": 0, "Transferring": 1, "Success": 7, "Failed": 0},
            "ring": {
                "used_bytes": 1 << 20,
                "capacity_bytes": 16 << 20,
                "high_water_bytes": 4 << 20,
            },
            "peers": ["tcp://127.0.0.1:17100"],
            "kv_pages": {"used": 30, "total": 512},
        }
    ],
}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _write(tmp_path: Path, raw: dict, name: str = "deploy.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _two_daemons(prefill_port: int, decode_port: int) -> dict:
    return {
        "daemons": [
            {"role": "prefill", "name": "prefill-0", "http_port": prefill_port},
            {
                "role": "decode",
                "name": "decode-0",
                "http_port": decode_port,
                "prefill": ["tcp://127.0.0.1:1"],
            },
        ]
    }


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- config, serve, help ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["up"],
        ["generate"],
        ["status"],
        ["config"],
        ["config", "check"],
        ["config", "show"],
    ],
)
def test_every_command_has_help(command):
    result = _invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_config_check_accepts_the_embedded_default():
    result = _invoke("config", "check", str(LOCAL_YAML))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{LOCAL_YAML}: ok (2 daemons)\n"


def test_config_check_names_an_unknown_field(tmp_path):
    path = _write(tmp_path, {"daemons": [{"role": "prefill", "tpp": 2}]})
    line = _one_error_line(_invoke("config", "check", path))
    assert "tpp" in line and "$.daemons[0]" in line and path in line


def test_config_check_runs_the_model_checks(tmp_path):
    path = _write(tmp_path, {"daemons": [{"role": "prefill", "name": "p", "tp": 3}]})
    assert "p: tp" in _one_error_line(_invoke("config", "check", path))


def test_config_check_of_a_missing_file(tmp_path):
    assert "missing.yaml" in _one_error_line(
        _invoke("config", "check", str(tmp_path / "missing.yaml"))
    )


def test_config_show_fills_every_default_and_round_trips():
    result = _invoke("config", "show", str(LOCAL_YAML))
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert parse(shown) == load(LOCAL_YAML)
    assert shown["daemons"][0]["model"]["name"] == "kvferry-tiny"  # a default, absent in the file
    assert list(shown["daemons"][0])[:2] == ["role", "name"]  # field order, not sorted


def test_config_show_one_daemon():
    result = _invoke("config", "show", str(LOCAL_YAML), "--name", "decode-0")
    assert [d["name"] for d in yaml.safe_load(result.stdout)["daemons"]] == ["decode-0"]
    assert "no daemon named 'decode-9'" in _one_error_line(
        _invoke("config", "show", str(LOCAL_YAML), "--name", "decode-9")
    )


def test_serve_picks_the_named_daemon(monkeypatch):
    served = []
    fake = types.ModuleType("kvferry.daemon.serve")
    fake.serve = lambda daemon: served.append(daemon) or 3
    monkeypatch.setitem(sys.modules, "kvferry.daemon.serve", fake)
    monkeypatch.delenv("KVFERRY_LOG_LEVEL", raising=False)  # serve sets it; restored after
    result = _invoke("serve", "--config", str(LOCAL_YAML), "--name", "decode-0")
    assert result.exit_code == 3
    assert [d.name for d in served] == ["decode-0"]
    assert "pick one with --name" in _one_error_line(_invoke("serve", "--config", str(LOCAL_YAML)))


# --- generate and status against a stub daemon -----------------------------------------------


def _event(text: str, ids: list[int], finish: str | None = None, **extra) -> dict:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    return {"id": "cmpl-1", "object": "text_completion", "choices": [choice], **extra}


USAGE = {"prompt_tokens": 3, "completion_tokens": 3}
STREAMS = {
    "fail midway": [_event("He", [72]), {"error": {"message": "peer lost", "type": "transfer"}}],
    "cut short": [_event("He", [72])],  # no [DONE]: the daemon went away
}


class _StubDaemon(BaseHTTPRequestHandler):
    """Follows the daemons' HTTP contract; a few prompts trigger its error paths."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path in ("/status", "/health"):
            self._json(200, self.server.status if self.path == "/status" else {"status": "ok"})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        if body["prompt"] == "too long":
            error = {"message": "prompt has 5000 tokens, max_prompt_tokens=4096", "type": "invalid"}
            self._json(400, {"error": error})
        elif not body["stream"]:
            self._json(200, _event("Hello", [72, 101, 108], "length", usage=USAGE))
        else:
            self._stream(body["prompt"])

    def _stream(self, prompt):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk(": keep-alive comment\n\n")
        if prompt == "slow":
            time.sleep(1.0)
        default = [_event("He", [72]), _event("llo", [101, 108], "length", usage=USAGE)]
        for event in STREAMS.get(prompt, default):
            self._chunk(f"data: {json.dumps(event)}\n\n")
        if prompt != "cut short":
            self._chunk("data: [DONE]\n\n")
        self._chunk("")
        self.close_connection = True

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubDaemon)
    server.seen, server.status = [], STATUS
    server.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_generate_json_reports_the_streamed_completion(stub):
    result = _invoke(
        "generate", "hi", "--url", stub.url, "--json", "--seed", "7", "--max-tokens", "3"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert list(answer) == [
        "text",
        "token_ids",
        "prompt_tokens",
        "finish_reason",
        "ttft_s",
        "latency_s",
    ]
    assert answer["text"] == "Hello" and answer["token_ids"] == [72, 101, 108]
    assert (answer["prompt_tokens"], answer["finish_reason"]) == (3, "length")
    assert 0 <= answer["ttft_s"] <= answer["latency_s"]
    assert stub.seen == [
        {
            "prompt": "hi",
            "max_tokens": 3,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 7,
            "stream": True,
        }
    ]


def test_generate_prints_text_as_it_streams(stub):
    result = _invoke("generate", "hi", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello\n"
    assert "3 tokens, finish length" in result.stderr


def test_generate_token_ids_unstreamed(stub):
    result = _invoke(
        "generate", "--prompt-ids", "1, 2,3", "--url", stub.url, "--no-stream", "--json"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["text"] == "Hello" and answer["ttft_s"] is None
    assert stub.seen[0]["prompt"] == [1, 2, 3] and stub.seen[0]["stream"] is False


def test_generate_finds_the_decode_daemon_in_a_config(stub, tmp_path):
    (dead,) = _free_ports(1)
    path = _write(tmp_path, _two_daemons(dead, stub.server_port))
    result = _invoke("generate", "hi", "--config", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == "Hello"


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ("too long", "HTTP 400: prompt has 5000 tokens, max_prompt_tokens=4096"),
        ("fail midway", ": peer lost"),
        ("cut short", "the stream ended before [DONE]"),
    ],
)
def test_generate_errors_are_one_line(stub, prompt, fragment):
    result = _invoke("generate", prompt, "--url", stub.url)
    line = _one_error_line(result)
    assert fragment in line and stub.url in line
    if prompt != "too long":
        assert result.stdout == "He\n"  # what arrived before the error, line ended


def test_generate_against_nothing_names_the_url():
    (dead,) = _free_ports(1)
    line = _one_error_line(_invoke("generate", "hi", "--url", f"http://127.0.0.1:{dead}"))
    assert line == f"Error: http://127.0.0.1:{dead}: connection refused"


@pytest.mark.parametrize(
    "args", [["hi", "--prompt-ids", "1"], [], ["--prompt-ids", "1,x"], ["--prompt-ids", ","]]
)
def test_generate_usage_errors(args):
    result = _invoke("generate", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_client_streams_and_times_out(stub):
    client = DaemonClient(stub.url, timeout=5)
    assert client.health() == {"status": "ok"} and client.is_ready()
    pieces = []
    completion = client.stream(CompletionRequest(prompt="hi"), pieces.append)
    assert pieces == ["He", "llo"] and completion.token_ids == [72, 101, 108]
    assert client.complete(CompletionRequest(prompt=[5])).finish_reason == "length"
    with pytest.raises(ServerError, match="no route") as caught:
        client._get("/nowhere")
    assert caught.value.status == 404
    with pytest.raises(RequestTimeout):
        DaemonClient(stub.url, timeout=0.2).stream(CompletionRequest(prompt="slow"))
    with pytest.raises(ClientError, match="not an http"):
        DaemonClient("127.0.0.1:17000")


def test_status_summary(stub):
    result = _invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert f"decode-0: decode, serving, tp=1, {stub.url}" in result.stdout
    assert "requests: waiting 1, arriving 0, running 2" in result.stdout
    assert "rank 0: rooms Transferring 1, Success 7" in result.stdout
    assert "ring 1.0 MiB / 16.0 MiB (high 4.0 MiB)" in result.stdout
    assert "kv pages 30/512 | peers tcp://127.0.0.1:17100" in result.stdout


def test_status_tolerates_missing_keys(stub):
    stub.status = {"role": "prefill", "ranks": [{"rank": 0, "ring": {}}]}
    result = _invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert "ring ? / ? (high ?)" in result.stdout


def test_status_json_and_an_unreachable_daemon(stub, tmp_path):
    (dead,) = _free_ports(1)
    path = _write(tmp_path, _two_daemons(dead, stub.server_port))
    result = _invoke("status", "--config", path, "--json")
    assert _one_error_line(result) == "prefill-0: unreachable (connection refused)"
    missing, answer = json.loads(result.stdout)
    assert missing["name"] == "prefill-0" and missing["error"] == "connection refused"
    assert answer == STATUS


# --- launcher and `up`, with stub daemon processes -------------------------------------------

# A stand-in daemon: answers /health with 503 twice, then 200; notes what happens in a shared log.
STUB_DAEMON = """
import http.server, os, signal, sys, threading, time
name, port, log, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {name}\\n")

def on_sigterm(signum, frame):
    time.sleep(0.3 if mode == "slow-stop" else 0)
    note("stop")
    os._exit(0)

note("start")
if mode == "crash":
    sys.exit(5)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_sigterm)
probes = []

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        probes.append(self.path)
        ready = mode != "never" and len(probes) > 2
        if ready and len(probes) == 3:
            note("ready")
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if ready and mode == "die":
            threading.Timer(0.2, os._exit, (3,)).start()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


class _Stubs:
    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "stub_daemon.py"
        self.script.write_text(STUB_DAEMON)
        self.log = tmp_path / "events.log"
        self.modes: dict[str, str] = {}
        self.raw = _two_daemons(*_free_ports(2))
        self.deployment = parse(self.raw)
        self.config_path = _write(tmp_path, self.raw)

    def command(self, daemon) -> list[str]:
        mode = self.modes.get(daemon.name, "ok")
        port, log = str(daemon.http_port), str(self.log)
        return [sys.executable, str(self.script), daemon.name, port, log, mode]

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def launcher(self, lines: list[str]) -> Launcher:
        return Launcher(self.deployment, command=self.command, log=lines.append, poll_s=0.05)


@pytest.fixture
def stubs(tmp_path):
    return _Stubs(tmp_path)


def test_launcher_starts_prefill_first_and_stops_it_last(stubs):
    lines = []
    stubs.modes["decode-0"] = "slow-stop"  # stopping both at once would log prefill first
    with stubs.launcher(lines) as launcher:
        launcher.start(timeout=30)
        assert stubs.events() == [
            "start prefill-0",
            "ready prefill-0",
            "start decode-0",
            "ready decode-0",
        ]
        assert launcher.wait(timeout=0.1) is None  # all running
        codes = launcher.stop(timeout=10)
    assert codes == {"decode-0": 0, "prefill-0": 0}
    assert stubs.events()[-2:] == ["stop decode-0", "stop prefill-0"]
    url = launcher.children[0].url
    assert any(line.startswith(f"prefill-0 ready on {url} (") for line in lines)


def test_launcher_reports_a_daemon_that_dies(stubs):
    stubs.modes["decode-0"] = "die"
    with stubs.launcher([]) as launcher:
        launcher.start(timeout=30)
        died = launcher.wait(timeout=30)
        assert died is not None and (died.name, died.returncode) == ("decode-0", 3)
        codes = launcher.stop(timeout=10)
    assert codes == {"decode-0": 3, "prefill-0": 0}


def test_launcher_kills_a_daemon_that_ignores_sigterm(stubs):
    stubs.modes["prefill-0"] = "stubborn"
    with stubs.launcher([]) as launcher:
        launcher.start(timeout=30)
        codes = launcher.stop(timeout=0.3)
    assert codes == {"decode-0": 0, "prefill-0": -signal.SIGKILL}


@pytest.mark.parametrize(
    "mode, fragment",
    [("crash", "prefill-0 exited with code 5 before it was ready"), ("never", "not ready after")],
)
def test_launcher_start_failures(stubs, mode, fragment):
    stubs.modes["prefill-0"] = mode
    with pytest.raises(LaunchError, match=fragment), stubs.launcher([]) as launcher:
        launcher.start(timeout=1)
    assert "start decode-0" not in stubs.events()
    assert all(child.returncode is not None for child in launcher.children if child.process)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"name": ""}, "has no name"),
        ({"name": "decode-0"}, "used more than once"),
        ({"http_port": 0}, "needs to know the port"),
        (None, "no daemons"),
    ],
)
def test_deployments_the_launcher_refuses(tmp_path, change, fragment):
    raw = _two_daemons(*_free_ports(2))
    if change is None:
        raw["daemons"] = []
    else:
        raw["daemons"][0].update(change)
    with pytest.raises(ConfigError, match=fragment):
        Launcher(parse(raw), command=lambda daemon: ["true"])
    assert fragment in _one_error_line(_invoke("up", "--config", _write(tmp_path, raw)))


def test_up_runs_until_sigterm(stubs, monkeypatch):
    monkeypatch.setattr(launcher_module, "serve_command", lambda path, log_level: stubs.command)
    note = cli_module.note

    def note_and_stop(line):  # stands in for the user's Ctrl-C once everything is up
        note(line)
        if line.startswith("all daemons ready"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli_module, "note", note_and_stop)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = _invoke("up", "--config", stubs.config_path)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert result.exit_code == 0, result.output
    urls = [f"http://127.0.0.1:{d['http_port']}" for d in stubs.raw["daemons"]]
    assert result.stdout == f"prefill-0\tprefill\t{urls[0]}\ndecode-0\tdecode\t{urls[1]}\n"
    assert stubs.events()[-2:] == ["stop decode-0", "stop prefill-0"]


def test_up_exits_1_when_a_daemon_dies(stubs, monkeypatch):
    monkeypatch.setattr(launcher_module, "serve_command", lambda path, log_level: stubs.command)
    stubs.modes["decode-0"] = "die"
    result = _invoke("up", "--config", stubs.config_path)
    assert result.exit_code == 1
    assert "decode-0 exited with code 3 on its own; stopping the others" in result.stderr
    assert "prefill-0 exited 0" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: decode-0 exited with code 3 while running"
    )
