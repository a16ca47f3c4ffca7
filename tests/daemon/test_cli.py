"""The `kvferry` CLI, its HTTP client and the deployment launcher, against stub daemons."""

import json
import re
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from ports import free_ports

from cli_sim import invoke, one_error_line, two_daemons, write_yaml
from kvferry.daemon.client import (
    ClientError,
    CompletionRequest,
    DaemonClient,
    RequestTimeout,
    ServerError,
)
from kvferry.daemon.config import load, parse

LOCAL_YAML = Path(__file__).parents[2] / "deploy" / "local.yaml"

STATUS = {
    "role": "decode",
    "name": "decode-0",
    "state": "serving",
    "tp": 1,
    "requests": {"waiting": 1, "arriving": 0, "running": 2},
    "prefill": [
        {"address": "tcp://127.0.0.1:17100", "reachable": True, "last_error": None},
        {
            "address": "tcp://127.0.0.1:17200",
            "reachable": False,
            "last_error": "no answer in 2s",
            "last_seen": None,
        },
        {"address": "tcp://127.0.0.1:17300", "reachable": None, "last_error": None},
    ],
    "bootstrap": None,
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
            "pid": 4242,
            "control_address": "tcp://127.0.0.1:41234",
        }
    ],
}


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
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_config_check_accepts_the_embedded_default():
    result = invoke("config", "check", str(LOCAL_YAML))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{LOCAL_YAML}: ok (2 daemons)\n"


def test_config_check_names_an_unknown_field(tmp_path):
    path = write_yaml(tmp_path, {"daemons": [{"role": "prefill", "tpp": 2}]})
    line = one_error_line(invoke("config", "check", path))
    assert "tpp" in line and "$.daemons[0]" in line and path in line


def test_config_check_runs_the_model_checks(tmp_path):
    path = write_yaml(tmp_path, {"daemons": [{"role": "prefill", "name": "p", "tp": 3}]})
    assert "p: tp" in one_error_line(invoke("config", "check", path))


def test_config_check_of_a_missing_file(tmp_path):
    assert "missing.yaml" in one_error_line(
        invoke("config", "check", str(tmp_path / "missing.yaml"))
    )


def test_config_show_fills_every_default_and_round_trips():
    result = invoke("config", "show", str(LOCAL_YAML))
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert parse(shown) == load(LOCAL_YAML)
    assert shown["daemons"][0]["model"]["name"] == "kvferry-tiny"  # a default, absent in the file
    assert list(shown["daemons"][0])[:2] == ["role", "name"]  # field order, not sorted


def test_config_show_one_daemon():
    result = invoke("config", "show", str(LOCAL_YAML), "--name", "decode-0")
    assert [d["name"] for d in yaml.safe_load(result.stdout)["daemons"]] == ["decode-0"]
    assert "no daemon named 'decode-9'" in one_error_line(
        invoke("config", "show", str(LOCAL_YAML), "--name", "decode-9")
    )


def test_serve_picks_the_named_daemon(monkeypatch):
    served = []
    fake = types.ModuleType("kvferry.daemon.serve")
    fake.serve = lambda daemon: served.append(daemon) or 3
    monkeypatch.setitem(sys.modules, "kvferry.daemon.serve", fake)
    monkeypatch.delenv("KVFERRY_LOG_LEVEL", raising=False)  # serve sets it; restored after
    result = invoke("serve", "--config", str(LOCAL_YAML), "--name", "decode-0")
    assert result.exit_code == 3
    assert [d.name for d in served] == ["decode-0"]
    assert "pick one with --name" in one_error_line(invoke("serve", "--config", str(LOCAL_YAML)))


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
    result = invoke(
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
    result = invoke("generate", "hi", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello\n"
    assert "3 tokens, finish length" in result.stderr


def test_generate_token_ids_unstreamed(stub):
    result = invoke(
        "generate", "--prompt-ids", "1, 2,3", "--url", stub.url, "--no-stream", "--json"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["text"] == "Hello" and answer["ttft_s"] is None
    assert stub.seen[0]["prompt"] == [1, 2, 3] and stub.seen[0]["stream"] is False


def test_generate_finds_the_decode_daemon_in_a_config(stub, tmp_path):
    (dead,) = free_ports(1)
    path = write_yaml(tmp_path, two_daemons(dead, stub.server_port))
    result = invoke("generate", "hi", "--config", path, "--json")
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
    result = invoke("generate", prompt, "--url", stub.url)
    line = one_error_line(result)
    assert fragment in line and stub.url in line
    if prompt != "too long":
        assert result.stdout == "He\n"  # what arrived before the error, line ended


def test_generate_against_nothing_names_the_url():
    (dead,) = free_ports(1)
    line = one_error_line(invoke("generate", "hi", "--url", f"http://127.0.0.1:{dead}"))
    assert line == f"Error: http://127.0.0.1:{dead}: connection refused"


@pytest.mark.parametrize(
    "args", [["hi", "--prompt-ids", "1"], [], ["--prompt-ids", "1,x"], ["--prompt-ids", ","]]
)
def test_generate_usage_errors(args):
    result = invoke("generate", *args)
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
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert f"decode-0: decode, serving, tp=1, {stub.url}" in result.stdout
    assert "requests: waiting 1, arriving 0, running 2" in result.stdout
    assert "rank 0: rooms Transferring 1, Success 7" in result.stdout
    assert "ring 1.0 MiB / 16.0 MiB (high 4.0 MiB)" in result.stdout
    assert "kv pages 30/512 | peers tcp://127.0.0.1:17100" in result.stdout
    assert "| pid 4242 | control tcp://127.0.0.1:41234" in result.stdout


def test_status_shows_each_prefill_as_decode_sees_it(stub):
    stub.status = {**STATUS, "prefill": [dict(STATUS["prefill"][0], last_seen=time.time() - 3)]}
    stub.status["prefill"] += STATUS["prefill"][1:]
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        r"  prefill tcp://127.0.0.1:17100: reachable \| last seen \d+\.\d s ago", lines[2]
    )
    unreachable = "unreachable | last error: no answer in 2s | never seen"
    assert lines[3] == f"  prefill tcp://127.0.0.1:17200: {unreachable}"
    assert lines[4] == "  prefill tcp://127.0.0.1:17300: not probed yet"
    assert lines[5].startswith("  rank 0: ")


def test_status_shows_the_bootstrap_servers_counters(stub):
    counters = {"bad_frames": 2, "refused_registrations": 1, "dropped_replies": 0}
    bootstrap = {"address": "tcp://127.0.0.1:17100", **counters, "failed_frames": 0}
    stub.status = {**STATUS, "role": "prefill", "prefill": [], "bootstrap": bootstrap}
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert (
        "  bootstrap tcp://127.0.0.1:17100: bad_frames 2, refused_registrations 1, "
        "dropped_replies 0, failed_frames 0"
    ) in result.stdout.splitlines()


def test_status_tolerates_missing_keys(stub):
    stub.status = {"role": "prefill", "ranks": [{"rank": 0, "ring": {}}]}
    result = invoke("status", "--url", stub.url)
    assert result.exit_code == 0, result.output
    assert "ring ? / ? (high ?)" in result.stdout


def test_status_json_and_an_unreachable_daemon(stub, tmp_path):
    (dead,) = free_ports(1)
    path = write_yaml(tmp_path, two_daemons(dead, stub.server_port))
    result = invoke("status", "--config", path, "--json")
    assert one_error_line(result) == "prefill-0: unreachable (connection refused)"
    missing, answer = json.loads(result.stdout)
    assert missing["name"] == "prefill-0" and missing["error"] == "connection refused"
    assert answer == STATUS
