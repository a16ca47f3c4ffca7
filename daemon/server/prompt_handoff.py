"""Decode: hands a request's prompt to its prefill daemon (`SubmitPrompt` at the prefill's
bootstrap server) once the ranks have reserved its pages.

Each hand-off waits for the prefill's reply, so it runs on a small pool, off the daemon's loop;
a refusal, or no reply, aborts the request with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import zmq

from kvferry.daemon.server.request import DecodeRequest
from kvferry.transport.control import request as control_request
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.messages import Ack, Codec, ErrorReply, SubmitPrompt, WireError

log = logging.getLogger("kvferry.daemon")


class PromptHandoff:
    """`abort(room, failure)`: ends the request on the ranks, which answer with its end."""

    def __init__(
        self,
        context: zmq.Context,
        codec: Codec,
        timeout_s: float,
        abort: Callable[[int, Failure], None],
        refused: Callable[[str, str], None],
    ) -> None:
        """`refused(prefill, reason)`: told of each prefill that refused or did not answer."""
        self._context, self._codec, self._timeout_s, self._abort = context, codec, timeout_s, abort
        self._refused = refused
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="kvferry-submit")

    def submit(self, request: DecodeRequest) -> None:
        self._pool.submit(self._hand, request)

    def close(self) -> None:
        """Hand-offs not started are dropped: the daemon fails their requests as it stops."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _hand(self, request: DecodeRequest) -> None:
        p = request.params
        message = SubmitPrompt(request.room, request.prompt, p.temperature, p.top_p, p.seed)
        try:
            reply = control_request(
                self._context, self._codec, request.prefill, message, self._timeout_s
            )
        except (TimeoutError, WireError, zmq.ZMQError) as exc:
            reply = ErrorReply(str(exc))
        except Exception as exc:  # this runs in a pool, which would keep it silent: fail now
            log.exception("submitting room %#x to %s failed", request.room, request.prefill)
            reply = ErrorReply(f"{type(exc).__name__}: {exc}")
        if isinstance(reply, Ack):
            request.marks["prompt_at_prefill"] = time.time()
        else:
            reason = reply.reason if isinstance(reply, ErrorReply) else f"unexpected {reply!r}"
            refused = f"prefill {request.prefill} refused the prompt: {reason}"
            self._refused(request.prefill, reason)
            self._abort(request.room, Failure(FailureKind.REFUSED, refused))
