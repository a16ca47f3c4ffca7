"""The daemons' HTTP front: `POST /v1/completions` (decode; OpenAI-style, with server-sent
events when streaming), `GET /health`, `GET /status` and `GET /metrics` (both roles).

Each connection runs on its own thread; a handler talks to the daemon through `generate`,
`abort` and `metrics` only, and shows it as `daemon/server/status.py` reads it. A client that goes
away aborts its request.
"""

from __future__ import annotations

import contextlib
import json
import queue
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.server import status as shown
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.metrics import CONTENT_TYPE
from kvferry.daemon.server.request import Unavailable
from kvferry.transport.failure import Failure, FailureKind, aborted

MAX_BODY_BYTES = 1 << 20
POLL_S = 1.0  # a waiting handler checks its client and the daemon this often
MAX_HELD = 4  # tokens held back while the text ends in an incomplete character (UTF-8: <= 4)


class HTTPError(Exception):
    """An error answer: HTTP status, OpenAI error type, and the failure kind (`code`) when a
    request failed."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    @classmethod
    def of(cls, failure: Failure) -> HTTPError:
        status, kind = HTTP_STATUS.get(failure.kind, (502, "server_error"))
        return cls(status, failure.detail, kind, failure.kind.value)

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "code": self.code}}


# HTTP status and OpenAI error type of a failed request, by its failure's kind; 502 otherwise
HTTP_STATUS = {
    FailureKind.TIMEOUT: (504, "timeout"),
    FailureKind.UNAVAILABLE: (503, "unavailable"),
    FailureKind.INVALID_REQUEST: (400, "invalid_request_error"),
}


def start_http(daemon, host: str, port: int) -> ThreadingHTTPServer:
    """Serve on host:port (0: any free port) from a background thread."""
    handler = type("Handler", (_Handler,), {"daemon": daemon})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    # the daemon watches this thread: without it nobody can reach the daemon
    server.thread = threading.Thread(target=server.serve_forever, name="kvferry-http", daemon=True)
    server.thread.start()
    return server


class _Handler(BaseHTTPRequestHandler):
    daemon = None  # set per server
    protocol_version = "HTTP/1.1"
    server_version = "kvferry"

    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # the client left
            super().handle()

    def log_message(self, format, *args) -> None:
        pass  # requests are counted in the metrics, not logged line by line

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/health":
                self._json(*shown.health(self.daemon))
            elif path == "/status":
                self._json(200, shown.status(self.daemon))
            elif path == "/metrics":
                self._send(200, self.daemon.metrics.render(), CONTENT_TYPE)
            else:
                raise HTTPError(404, f"no such path: {path}", "not_found")
        except HTTPError as exc:
            self._error(exc)

    def do_POST(self) -> None:
        with self.daemon.answering_one():
            self._post()

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path != "/v1/completions" or self.daemon.config.role != "decode":
                raise HTTPError(404, f"no such path: POST {path}", "not_found")
            self._completion(self._body())
        except HTTPError as exc:
            self._error(exc)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # --- completions ------------------------------------------------------------------------

    def _body(self) -> CompletionRequest:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "a JSON body with Content-Length is required")
        if int(length) > MAX_BODY_BYTES:
            raise HTTPError(413, f"body of {length} bytes exceeds {MAX_BODY_BYTES}")
        raw = self.rfile.read(int(length))
        try:
            return msgspec.json.decode(raw, type=CompletionRequest)
        except msgspec.ValidationError as exc:
            raise HTTPError(400, f"bad request body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None
        except RecursionError:  # msgspec walks the fields it skips recursively too
            raise HTTPError(400, "body is nested too deeply") from None

    def _completion(self, body: CompletionRequest) -> None:
        daemon = self.daemon
        prompt = (
            body.prompt if isinstance(body.prompt, list) else daemon.tokenizer.encode(body.prompt)
        )
        try:
            params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed)
            request = daemon.generate(prompt, params)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        except Unavailable as exc:
            raise HTTPError(503, str(exc), "unavailable") from None
        completion_id = f"cmpl-{request.room:016x}"
        try:
            if body.stream:
                self._stream(request, completion_id)
            else:
                self._whole(request, completion_id)
        except (BrokenPipeError, ConnectionResetError):
            daemon.abort(request.room, aborted("client went away"))

    def _events(self, request):
        """(new tokens, finish) as they come; ConnectionResetError once the client has gone
        (checked every POLL_S, tokens or not: a non-streaming answer writes nothing until the
        end), HTTPError if the daemon stops answering."""
        check_at = time.monotonic() + POLL_S
        while True:
            try:
                tokens, finish = request.events.get(timeout=POLL_S)
            except queue.Empty:
                if request.finish is None and time.monotonic() > request.deadline + 30:
                    raise HTTPError(504, "request lost: no answer from the ranks") from None
                tokens, finish = None, None
            if finish is None and time.monotonic() >= check_at:
                check_at = time.monotonic() + POLL_S
                if _client_gone(self.connection):
                    raise ConnectionResetError("the client closed its connection")
            if tokens is None:
                continue
            yield tokens, finish
            if finish is not None:
                return

    def _whole(self, request, completion_id: str) -> None:
        for _ in self._events(request):
            pass
        if request.error:
            raise HTTPError.of(request.error)
        text = self.daemon.tokenizer.decode(request.tokens)
        whole = self._chunk(request, completion_id, text, request.tokens, request.finish)
        whole["timeline"] = request.timeline()
        self._json(200, whole)

    def _stream(self, request, completion_id: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        tokenizer, ids, shown, sent = self.daemon.tokenizer, [], "", 0
        for tokens, finish in self._events(request):
            if finish is not None and request.error:
                self._event(HTTPError.of(request.error).body())
                break
            ids.extend(tokens)
            text = tokenizer.decode(ids)
            if text.endswith("\ufffd") and finish is None and len(ids) - sent < MAX_HELD:
                continue  # maybe half a character: wait a little for the rest
            chunk = self._chunk(request, completion_id, text[len(shown) :], ids[sent:], finish)
            shown, sent = text, len(ids)
            if finish is None:
                del chunk["usage"]
            else:  # kvferry's own: where this request's time went (transport/timeline.py)
                chunk["timeline"] = request.timeline()
            self._event(chunk)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _chunk(self, request, completion_id, text, token_ids, finish) -> dict:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.daemon.config.model.name,
            "choices": [
                {"index": 0, "text": text, "token_ids": list(token_ids), "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": len(request.prompt),
                "completion_tokens": len(request.tokens),
                "total_tokens": len(request.prompt) + len(request.tokens),
            },
        }

    # --- plumbing ---------------------------------------------------------------------------

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, exc: HTTPError) -> None:
        self._json(exc.status, exc.body())

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _client_gone(sock: socket.socket) -> bool:
    """Whether the client has closed its end: the socket reads as end of file. A client waiting
    for its answer sends nothing, so a readable socket that is not at its end holds a pipelined
    next request, which stays unread."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:  # reset, or closed under us
        return True
