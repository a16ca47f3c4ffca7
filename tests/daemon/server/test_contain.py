"""The HTTP front's outermost layer (daemon/server/contain.py), driven as uvicorn drives an ASGI
app: a request whose handling raises is counted and answered with a 500 if nothing was sent
yet, and the exception goes no further."""

import asyncio
import json

from kvferry.daemon.server.contain import ContainErrors

SCOPE = {"type": "http", "method": "POST", "path": "/v1/completions"}


def _serve(app) -> tuple[list[dict], int]:
    """What the contained `app` sent, and how many errors it counted."""
    sent, counted = [], []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(ContainErrors(app, lambda: counted.append(1))(dict(SCOPE), receive, send))
    return sent, len(counted)


def test_a_handler_that_raises_gets_a_500_and_a_count():
    async def app(scope, receive, send):
        raise KeyError("a bug")

    sent, counted = _serve(app)
    assert counted == 1
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "server_error" and error["message"] == "internal error: KeyError"


def test_a_handler_that_raises_mid_answer_is_counted_and_not_answered_twice():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        raise RuntimeError("a bug mid-stream")

    sent, counted = _serve(app)
    assert counted == 1
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_an_answer_without_errors_is_passed_through_uncounted():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent, counted = _serve(app)
    assert counted == 0 and sent[0]["status"] == 204
