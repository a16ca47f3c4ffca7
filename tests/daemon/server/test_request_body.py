"""The decode front's reading of a request body, driven through its ASGI app as uvicorn drives
it: a client that leaves before its body is in ends the request with an answer nobody reads,
never with an exception out of the app (which uvicorn logs as an internal error, a traceback
per request: a client could fill the logs by opening and dropping requests)."""

import asyncio
import json
from types import SimpleNamespace

from kvferry.daemon.server.http_front import _app
from kvferry.daemon.server.http_protocol import GONE


def _daemon():
    """What the body's reading looks at before any request starts (a unit test's stand-in)."""
    config = SimpleNamespace(role="decode", http_max_body_bytes=1 << 20, http_body_timeout_s=5.0)
    return SimpleNamespace(config=config)


def _post(messages: list[dict]) -> list[dict]:
    """POST /v1/completions announcing 100 bytes of body; the client's side of the connection
    delivers `messages` (then waits forever). What the app sent back."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"x"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 17000),
    }
    incoming, sent = list(messages), []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # a connection with nothing more to say

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(_app(_daemon())(scope, receive, send), 10))
    return sent


def test_a_client_that_leaves_mid_body_gets_an_answer_not_an_internal_error():
    sent = _post(
        [
            {"type": "http.request", "body": b'{"prompt": [1,', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    assert start["type"] == "http.response.start" and start["status"] == GONE
    assert "left before its request body arrived" in json.loads(body)["error"]["message"]


def test_a_body_that_is_not_json_is_still_a_400():
    """The same path with the whole body in: the checks after the read are unchanged."""
    sent = _post([{"type": "http.request", "body": b"x" * 100, "more_body": False}])
    assert sent[0]["status"] == 400
