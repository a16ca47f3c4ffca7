"""One sender per fuzzed socket: a callable that makes the next frame (ZeroMQ) or request
(HTTP), sends it and returns (family, bytes, outcome or None); `closing_outcomes()` counts what
came back once the last one was sent. Used as a context manager, which closes what it opened.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import zmq

from kvferry.daemon.cli.fuzz.frames import FrameMaker
from kvferry.daemon.cli.fuzz.http_requests import HttpMaker, send_http
from kvferry.daemon.cli.fuzz.targets import FuzzedSocket, Targets
from kvferry.daemon.cli.fuzz.zmq_sender import ZmqFuzzer
from kvferry.transport import curve

LEFT_OPEN = "left open"  # outcome: sockets whose multipart message never left (zmq_sender.py)

# contexts with fuzzer sockets that could not be closed safely, kept from the garbage collector
# (which would close them) until the process exits
_abandoned: list[zmq.Context] = []


class Sender:
    """send() -> (family, bytes, outcome or None); closing_outcomes() what came back."""

    def __init__(self, send, outcomes=lambda: {}, close=lambda: None) -> None:
        self._send, self.closing_outcomes, self._close = send, outcomes, close

    def __call__(self):
        return self._send()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._close()


def zmq_sender(
    target: FuzzedSocket, targets: Targets, seed: int, mode: str, max_message_bytes: int
) -> Sender:
    """`mode`: "stranger" (no secret key), "member" (the deployment's keys) or "" (no keys)."""
    maker = FrameMaker(target.kind, seed, targets.learned, max_message_bytes)
    stranger = mode == "stranger"
    context = curve.context(None if stranger else targets.keys)
    fuzzer = ZmqFuzzer(context, target.address, seed, targets.keys.public if stranger else None)

    def send():
        frame = maker.next()
        size = sum(len(part) for part in frame.parts)
        return frame.family, size, None if fuzzer.send(frame) else "refused"

    def outcomes() -> dict[str, int]:
        left_open = fuzzer.close()  # drains the last replies first
        found = {f"reply {kind}": count for kind, count in fuzzer.replies.items()}
        return found | ({LEFT_OPEN: left_open} if left_open else {})

    def close() -> None:
        if fuzzer.close() == 0:
            curve.close(context)
        else:  # terminating it would close them, which may abort this process (zmq_sender.py)
            _abandoned.append(context)

    return Sender(send, outcomes, close)


def http_sender(target: FuzzedSocket, targets: Targets, seed: int, timeout_s: float) -> Sender:
    parts = urlsplit(target.address)
    host, port = parts.hostname, parts.port
    maker = HttpMaker(seed, targets.learned.vocab_size, f"{host}:{port}")

    def send():
        request = maker.next()
        status = send_http(host, port, request, timeout_s)
        return request.family, len(request.data), status

    return Sender(send)
