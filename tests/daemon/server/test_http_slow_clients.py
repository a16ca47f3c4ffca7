"""Clients that are slow to send their request headers, or never send them, on real sockets:
the decode daemon's front closes them after `http_header_timeout_s` (small here) and serves
everyone else meanwhile."""

import socket
import time
from urllib.parse import urlsplit

import pytest

from kvferry.daemon.server.config import ConfigError, DaemonConfig, parse
from support.cluster import client, decode, generate, prefill, running, write

HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 5.0  # the slow body below takes about 2 s
GIVE_UP_S = 60.0  # far beyond the timeout: a connection still open by then is never closed


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    p = prefill("prefill-0")
    d = decode(
        "decode-0", [p], http_header_timeout_s=HEADER_TIMEOUT_S, http_body_timeout_s=BODY_TIMEOUT_S
    )
    path = write(tmp_path_factory.mktemp("slow"), [p, d])
    with running(path) as launcher:
        yield launcher


@pytest.fixture
def connect(slow_pair):
    """Opens raw connections to the decode daemon's front; closes them after the test."""
    parts = urlsplit(client(slow_pair, "decode-0").url)
    opened = []

    def open_one() -> socket.socket:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=GIVE_UP_S)
        opened.append(sock)
        return sock

    yield open_one
    for sock in opened:
        sock.close()


def test_a_slow_or_silent_client_is_closed_while_others_are_served(slow_pair, connect):
    silent, slow = connect(), connect()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    # meanwhile: a completion and a health check, on connections of their own
    assert generate(slow_pair, "decode-0", [1, 2, 3], max_tokens=3).token_ids
    assert client(slow_pair, "decode-0").health()["status"] == "ok"
    assert _closed_by_server(silent) and _closed_by_server(slow)


def test_headers_sent_a_byte_at_a_time_do_not_keep_a_connection(connect):
    """Each byte comes well within the timeout, the headers never end: still closed."""
    assert _closed_while_trickling(connect(), b"GET /health HTTP/1.1\r\nX-Slow: ")


def test_a_kept_alive_connection_gets_the_timeout_again_for_its_next_request(connect):
    sock = connect()
    for _ in range(2):  # request after request on one connection, each sent whole
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 200 ")
    assert _closed_while_trickling(sock, b"GET /health HTTP/1.1\r\n")


def test_a_body_that_never_ends_gets_a_408(connect):
    sock = connect()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    sock.sendall(head + b'{"prompt": [1,')  # and nothing more
    answer = _response(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 5 s" in answer


def test_once_the_headers_are_in_the_body_has_its_own_time(connect):
    """The body comes slowly, over several times the header timeout: still answered."""
    sock = connect()
    body = b'{"prompt": [4, 5, 6], "max_tokens": 2}'
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode())
    pieces = [body[i : i + 2] for i in range(0, len(body), 2)]
    for piece in pieces:  # 20 pieces, 0.1 s apart: 4 x HEADER_TIMEOUT_S
        time.sleep(0.1)
        sock.sendall(piece)
    assert _response(sock).startswith(b"HTTP/1.1 200 ")


def test_the_timeout_is_checked_at_load():
    fields = {"role": "decode", "prefill": ["tcp://127.0.0.1:1"]}
    assert parse(fields, DaemonConfig).http_header_timeout_s == 10.0
    with pytest.raises(ConfigError, match="http_header_timeout_s=0"):
        parse({**fields, "http_header_timeout_s": 0}, DaemonConfig)


def _closed_by_server(sock: socket.socket) -> bool:
    """Waits (up to GIVE_UP_S) for the server to end the connection without an answer."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def _closed_while_trickling(sock: socket.socket, start: bytes) -> bool:
    """Sends `start`, then one more header byte every 0.1 s until the server closes the
    connection (True) or GIVE_UP_S passes (False); nothing may come back before the close."""
    sock.sendall(start)
    sock.settimeout(0.1)
    give_up = time.monotonic() + GIVE_UP_S
    while time.monotonic() < give_up:
        try:
            received = sock.recv(1024)
        except TimeoutError:
            received = None
        except ConnectionResetError:
            return True
        if received is not None:
            assert received == b"", received  # no answer to headers that never ended
            return True
        try:
            sock.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def _response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body, read off `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        more = sock.recv(65536)
        assert more, body
        body += more
    return head + b"\r\n\r\n" + body
