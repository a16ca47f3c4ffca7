"""Helpers of the router tests: stub decode daemons whose answers a test picks, fast router
settings, and a decode daemon's /status with a chosen load."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from support.metrics_sim import samples

# Fast enough for tests: a target's /health is read every 0.1 s, a failed one is out for 0.5 s.
FAST = {
    "poll_interval_s": 0.1,
    "probe_timeout_s": 2.0,
    "backoff_s": 0.5,
    "resolve_interval_s": 0.2,
    "connect_timeout_s": 2.0,
    "request_timeout_s": 60.0,
    "drain_timeout_s": 5.0,
}


def event(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": finish}
    return b"data: " + json.dumps({"object": "text_completion", "choices": [choice]}).encode()


def error_event(kind: str) -> bytes:
    return b"data: " + json.dumps({"error": {"message": f"a {kind}", "type": kind}}).encode()


class StubHandler(BaseHTTPRequestHandler):
    """A decode daemon's HTTP contract; `server.mode` says how it answers completions:
    ok, unavailable (503), bad (400), late-error (504), first-error (a stream that starts with
    a retryable error), break (a stream cut after its first event), hang (never answers),
    stall (a stream that waits after its first event until the router closes it)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/health":
            code = self.server.health
            self._json(code, {"status": "ok" if code == 200 else "stopping", "pid": 0})
        elif self.path == "/status":
            self._json(200, self.server.status)
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.name}]})
        else:
            self._json(404, {"error": {"message": "no", "type": "not_found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        self.server.keys.append(self.headers.get("Authorization"))
        mode = self.server.mode
        if mode in ("unavailable", "bad", "late-error"):
            code = {"unavailable": 503, "bad": 400, "late-error": 504}[mode]
            self._json(code, {"error": {"message": f"{self.server.name} says {mode}"}})
        elif mode == "hang":
            self.server.hung.set()
            self.rfile.read(1)  # returns when the router closes the connection
            self.server.left.set()
        elif body.get("stream"):
            self._stream(mode)
        else:
            choice = {"index": 0, "text": self.server.name, "finish_reason": "length"}
            self._json(200, {"object": "text_completion", "choices": [choice]})

    def _stream(self, mode: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if mode == "first-error":
            events = [error_event("unavailable"), b"data: [DONE]"]
        else:
            events = [event(self.server.name), event("!", "length"), b"data: [DONE]"]
        for data in events[:1] if mode in ("break", "stall") else events:
            self._chunk(data + b"\n\n")
        if mode == "stall":
            self.server.hung.set()
            self.rfile.read(1)  # returns when the router closes the connection
            self.server.left.set()
            self.close_connection = True
            return
        if mode != "break":
            self._chunk(b"")  # the last chunk: a clean end
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")  # once shut down, it refuses every request
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def log_message(self, *args):
        pass


def status(in_flight: int = 0, free_pages: int = 100) -> dict:
    """A decode daemon's /status with this load."""
    requests = {"in_flight": in_flight, "waiting": 0, "arriving": 0, "running": in_flight}
    return {"requests": requests, "ranks": [{"kv_pages": {"used": 0, "total": free_pages}}]}


def stub_server(name: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A stub decode daemon on `host`, serving from its own thread: .url, .mode, .health,
    .status, .seen (the bodies it got) and .keys (their Authorization headers) are the test's
    to read and change."""
    server = ThreadingHTTPServer((host, port), StubHandler)
    server.daemon_threads = True
    server.name, server.url = name, f"http://{host}:{server.server_port}"
    server.mode, server.health, server.status, server.seen = "ok", 200, status(), []
    server.hung, server.left, server.keys = threading.Event(), threading.Event(), []
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a router's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def attempts(url: str) -> dict[tuple[str, str], float]:
    """kvferry_router_requests_total by (target, outcome)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (dict(labels)["target"], dict(labels)["outcome"]): value
        for (name, labels), value in samples(text).items()
        if name == "kvferry_router_requests_total"
    }


def complete(url: str, stream: bool = False, **fields) -> httpx.Response:
    """POST /v1/completions through the router, read in full."""
    body = {"prompt": [1, 2, 3], "max_tokens": 4, "stream": stream, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def events(response: httpx.Response) -> list[str]:
    """The data of each server-sent event of a streamed answer."""
    return [line[len("data: ") :] for line in response.text.split("\n\n") if line]
