"""Helpers of the CLI and launcher tests: deployment files, free ports, invoking `kvferry`, and a
stub daemon that follows the daemons' HTTP contract."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import yaml
from click.testing import CliRunner

from kvferry.daemon.cli.main import main


def write_yaml(tmp_path: Path, raw: dict, name: str = "deploy.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def two_daemons(prefill_port: int, decode_port: int) -> dict:
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


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- a stub daemon ---------------------------------------------------------------------------

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


def _event(text: str, ids: list[int], finish: str | None = None, **extra) -> dict:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    return {"id": "cmpl-1", "object": "text_completion", "choices": [choice], **extra}


USAGE = {"prompt_tokens": 3, "completion_tokens": 3}
STREAMS = {
    "fail midway": [_event("He", [72]), {"error": {"message": "peer lost", "type": "transfer"}}],
    "cut short": [_event("He", [72])],  # no [DONE]: the daemon went away
}


class StubDaemon(BaseHTTPRequestHandler):
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
