"""Decode: hands a request's prompt to its prefill daemon (`SubmitPrompt` at the prefill's
bootstrap server), at once or once the ranks have reserved its pages (`Requests.add` says
which), each room's once.

Each hand-off waits for the prefill's reply, so it runs on a small pool, off the daemon's loop,
over connections kept to each prefill (`requester.Requester`); a refusal, or no reply, goes to
the daemon with the reason: it tries another prefill (`prefill_retry.py`) or ends the request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import zmq

from kvferry.daemon.server.request import DecodeRequest
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.messages import Ack, Codec, ErrorReply, SubmitPrompt, WireError
from kvferry.transport.requester import Requester, RequesterClosed

log = logging.getLogger("kvferry.daemon")
BUSY_PAUSE_S = 0.01  # the first pause before a prompt refused as `busy` is sent again
BUSY_PAUSE_MAX_S = 0.2


class PromptHandoff:
    """`abort(room, failure)`: ends the request on the ranks, which answer with its end."""

    def __init__(
        self,
        context: zmq.Context,
        codec: Codec,
        timeout_s: float,
        failed: Callable[[DecodeRequest, int, Failure], None],
    ) -> None:
        """`failed(request, room, failure)`: the prefill refused the prompt of `room` or did
        not answer; the daemon tries another or ends the request."""
        self._requests, self._timeout_s = Requester(context, codec), timeout_s
        self._failed = failed
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="kvferry-submit")

    def submit(self, request: DecodeRequest) -> None:
        """Hand over the prompt of the room `request` has now."""
        request.handed_room = request.room
        self._pool.submit(self._hand, request, request.room, request.prefill)

    def reserved(self, request: DecodeRequest, room: int) -> None:
        """The ranks reserved the pages of `room`: its prompt goes now, unless it went already
        (before the reservation: Requests.add)."""
        if request.handed_room != room:
            self.submit(request)

    def close(self) -> None:
        """Hand-offs not started are dropped: the daemon fails their requests as it stops."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._requests.close()

    def _hand(self, request: DecodeRequest, room: int, prefill: str) -> None:
        if request.room != room:
            return  # it moved to another room (and prefill) while this waited in the pool
        p = request.params
        message = SubmitPrompt(room, request.prompt, p.temperature, p.top_p, p.seed)
        # a prefill too busy to hold the prompt now takes it once its other rooms register:
        # the same prompt again after a pause, until the registration deadline
        pause, give_up = BUSY_PAUSE_S, time.monotonic() + self._timeout_s
        reply = self._exchange(prefill, message)
        while isinstance(reply, ErrorReply) and reply.busy and request.room == room:
            if time.monotonic() + pause > give_up or self._closed.wait(pause):
                break
            pause = min(2 * pause, BUSY_PAUSE_MAX_S)
            reply = self._exchange(prefill, message)
        if isinstance(reply, Ack):
            request.marks["prompt_at_prefill"] = time.time()
        else:
            reason = reply.reason if isinstance(reply, ErrorReply) else f"unexpected {reply!r}"
            refused = f"prefill {prefill} refused the prompt: {reason}"
            self._failed(request, room, Failure(FailureKind.REFUSED, refused))

    def _exchange(self, prefill: str, message: SubmitPrompt):
        try:
            return self._requests.request(prefill, message, self._timeout_s)
        except (TimeoutError, WireError, zmq.ZMQError, RequesterClosed) as exc:
            return ErrorReply(str(exc))
        except Exception as exc:  # this runs in a pool, which would keep it silent: fail now
            log.exception("submitting room %#x to %s failed", message.room, prefill)
            return ErrorReply(f"{type(exc).__name__}: {exc}")
