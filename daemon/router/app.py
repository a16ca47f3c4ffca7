"""The router's HTTP API: the decode daemons' OpenAI API (`POST /v1/completions`,
`POST /v1/chat/completions`, `GET /v1/models`) passed on to one of them, and the router's own
`GET /health`, `GET /status` and `GET /metrics`. Errors in OpenAI's shape.

Every handler is a coroutine on the router's one event loop; a request in flight costs a
coroutine and two sockets, no thread.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvferry.daemon.router.errors import RouterError
from kvferry.daemon.router.metrics import CONTENT_TYPE
from kvferry.daemon.router.service import Router
from kvferry.daemon.server.http_protocol import GONE
from kvferry.daemon.server.sse import disconnected

CANCEL_S = 10.0  # a request whose client left: how long its attempt gets to wind down


class _Streaming(msgspec.Struct):
    """All the router reads of a body (other fields are the decode daemon's to check)."""

    stream: bool = False


def build_app(router: Router) -> Starlette:
    app = Starlette(
        routes=[
            Route("/health", _health),
            Route("/status", _status),
            Route("/metrics", _metrics),
            Route("/v1/completions", _post, methods=["POST"]),
            Route("/v1/chat/completions", _post, methods=["POST"]),
            Route("/v1/models", _models),
        ],
        exception_handlers={RouterError: _error, HTTPException: _no_route},
        lifespan=router.lifespan,
    )
    app.state.router = router
    return app


async def _post(request: Request) -> Response:
    router: Router = request.app.state.router
    try:
        body = await _body(request, router)
    except ClientDisconnect:
        return Response(status_code=GONE)
    call = router.call("POST", request.url.path, body, _streams(body))
    return await _answer(request, router, call)


async def _models(request: Request) -> Response:
    router: Router = request.app.state.router
    return await _answer(request, router, router.call("GET", "/v1/models", b"", False))


async def _answer(request: Request, router: Router, call) -> Response:
    """The forwarder's answer. A client that leaves first cancels it, which closes its request
    to the decode daemon: the daemon aborts it as it would for its own client."""
    assert router.forwarder is not None, "requests are served only while the app runs"
    work = asyncio.ensure_future(router.forwarder.forward(call))
    gone = asyncio.ensure_future(disconnected(request.receive))
    # the attempts time themselves out; this is the backstop of an answer that trickles in
    limit = call.deadline - time.monotonic() + CANCEL_S
    try:
        await asyncio.wait({work, gone}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work}, timeout=CANCEL_S)
    if work.done() and not work.cancelled():
        return work.result()  # even if the client left: a stream's relay must run to its end
    if gone.done() and not gone.cancelled():
        return Response(status_code=GONE)
    raise RouterError(504, "no answer within request_timeout_s", "timeout", "timeout")


async def _body(request: Request, router: Router) -> bytes:
    length = request.headers.get("content-length", "")
    most, timeout_s = router.config.http_max_body_bytes, router.config.http_body_timeout_s
    if length.isdigit() and int(length) > most:
        router.metrics.refused("http_max_body_bytes")
        raise RouterError(413, f"body of {length} bytes exceeds http_max_body_bytes={most}")
    try:
        return await asyncio.wait_for(_read(request, router), timeout_s)
    except asyncio.TimeoutError:
        raise RouterError(408, f"the body was not in within {timeout_s:g} s") from None


async def _read(request: Request, router: Router) -> bytes:
    chunks, size, most = [], 0, router.config.http_max_body_bytes
    async for chunk in request.stream():
        size += len(chunk)
        if size > most:
            router.metrics.refused("http_max_body_bytes")
            raise RouterError(413, f"body exceeds http_max_body_bytes={most}")
        chunks.append(chunk)
    return b"".join(chunks)


def _streams(body: bytes) -> bool:
    """Whether the body asks for a stream; a body that is not JSON is the daemon's to refuse."""
    try:
        return msgspec.json.decode(body, type=_Streaming).stream
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return False


async def _health(request: Request) -> Response:
    status, body = request.app.state.router.health()
    return JSONResponse(body, status)


async def _status(request: Request) -> Response:
    return JSONResponse(request.app.state.router.status())


async def _metrics(request: Request) -> Response:
    return Response(request.app.state.router.metrics.render(), media_type=CONTENT_TYPE)


def _error(request: Request, exc: RouterError) -> Response:
    return JSONResponse(exc.body(), exc.status)


def _no_route(request: Request, exc: HTTPException) -> Response:
    return _error(request, RouterError.no_route(request.method, request.url.path))
