"""The fronts' protocol on a real socket, with uvicorn serving a minimal app. A client that sends
malformed requests decides how often uvicorn warns about them: each such warning is written at
most once per period, saying how many it left out, and every one is still answered with a 400.
Headers past MAX_HEADER_BYTES get a 431 and the connection closes; a body is not counted."""

import functools
import logging
import os
import socket
import threading

import pytest
import uvicorn

from kvferry.daemon.server.http_protocol import MAX_HEADER_BYTES, HeaderTimeoutProtocol, QuietLog
from kvferry.transport.log_limit import RateLimitedLog

MALFORMED = b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def front():
    sock = socket.create_server(("127.0.0.1", 0))
    protocol = functools.partial(HeaderTimeoutProtocol, header_timeout_s=5.0)
    config = uvicorn.Config(_ok, log_config=None, lifespan="off", http=protocol, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, args=([sock],), daemon=True)
    thread.start()  # the socket already listens: connections wait in its backlog until then
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def _ask(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
            if request is not MALFORMED and b"ok" in answer:
                break
        return answer


def test_malformed_requests_are_answered_and_warned_about_once(front, caplog):
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    answers = [_ask(front, MALFORMED) for _ in range(20)]
    assert all(answer.startswith(b"HTTP/1.1 400") for answer in answers)
    warned = [r for r in caplog.records if "Invalid HTTP request" in r.getMessage()]
    assert len(warned) == 1  # the other 19 within the period: left out
    assert _ask(front, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_headers_past_the_limit_get_a_431_and_the_connection_closes(front):
    endless = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1024)
    answer = _ask(front, endless)  # read until the server closes
    assert answer.startswith(b"HTTP/1.1 431 ") and b"request headers over" in answer


def test_headers_under_the_limit_and_large_bodies_are_served(front):
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES - 1024)
    assert _ask(front, big + b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    body = b"b" * (4 * MAX_HEADER_BYTES)  # sent with the headers, in one write
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert _ask(front, head + body).startswith(b"HTTP/1.1 200 ")


def test_a_quiet_log_says_how_many_it_left_out(caplog):
    now = [0.0]
    logger = logging.getLogger("kvferry.test.quiet")
    log = QuietLog(logger, RateLimitedLog(logger, period_s=10.0, clock=lambda: now[0]))
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(3):
            log.warning("Invalid HTTP request received.")
        log.info("passed through as it is")
        now[0] = 11.0
        log.warning("Invalid HTTP request received.")
    assert [r.getMessage() for r in caplog.records] == [
        "Invalid HTTP request received.",
        "passed through as it is",
        "Invalid HTTP request received. (2 more suppressed)",
    ]


def test_connections_have_nagle_off(front):
    """The fronts listen on sockets of their own, whose connections asyncio leaves with Nagle's
    algorithm on: a stream's chunk written before the client acknowledged the previous one would
    wait for its delayed ACK. The protocol turns it off on every connection."""
    with socket.create_connection(("127.0.0.1", front), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")  # served, and kept alive
        (served,) = _accepted_sockets(conn.getsockname())
        with served:
            assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def _accepted_sockets(peer) -> list[socket.socket]:
    """This process's sockets connected to `peer` (the server side of a connection)."""
    found = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # not a socket (or closed meanwhile)
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername() == peer:
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found
