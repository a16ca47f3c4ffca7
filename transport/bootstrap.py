"""Bootstrap server (hosted by the prefill side): where decode ranks find the prefill ranks.

Prefill ranks register their layout, UCX address and control address; decode ranks ask for
the full set, which is answered once every rank of the prefill TP group has registered. Only
the ranks the daemon started may register: they prove it with the daemon's token, which never
leaves the daemon's processes. A prefill daemon also takes prompts here (`SubmitPrompt`, handed
to `on_submit` with the sender's network address). Any malformed or unexpected frame gets an
ErrorReply and is counted; nothing a frame does stops the server.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from collections.abc import Callable

import zmq

from kvferry.transport import curve
from kvferry.transport.control import limit_receive
from kvferry.transport.curve import CurveKeys
from kvferry.transport.log_limit import RateLimitedLog
from kvferry.transport.messages import (
    Ack,
    Codec,
    ErrorReply,
    FrameTooLarge,
    Message,
    Peers,
    PrefillLoad,
    QueryPeers,
    RankInfo,
    RegisterRank,
    SubmitPrompt,
    WireError,
    multipart_error,
)

log = logging.getLogger(__name__)
TOKEN_BYTES = 32
OnSubmit = Callable[[SubmitPrompt, str], Ack | ErrorReply]  # (prompt, sender's address)


class BootstrapServer:
    """Serves one prefill TP group of `tp_size` ranks on its own thread. `token`: the secret a
    rank's RegisterRank must carry (None: draw one; the owner hands `self.token` to its ranks)."""

    def __init__(
        self,
        tp_size: int,
        token: bytes | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_bytes: int = 1 << 20,
        on_submit: OnSubmit | None = None,
        load: Callable[[], PrefillLoad] | None = None,
        keys: CurveKeys | None = None,
    ) -> None:
        """`load`: the daemon's current load, sent with every Peers answer (called on the
        server's thread). `keys`: the deployment's CURVE pair; only its members get through."""
        self.tp_size, self.on_submit, self.load = tp_size, on_submit, load
        self.token = token if token is not None else secrets.token_bytes(TOKEN_BYTES)
        self.codec = Codec(max_frame_bytes)
        self._context = curve.context(keys)
        self._socket = self._context.socket(zmq.ROUTER)
        curve.serve(self._socket)
        self._socket.setsockopt(zmq.LINGER, 0)
        # a larger frame disconnects its sender before ZeroMQ allocates it
        limit_receive(self._socket, max_frame_bytes)
        if port:
            self._socket.bind(f"tcp://{host}:{port}")
        else:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.ranks: dict[int, RankInfo] = {}
        self.bad_frames = 0  # refused: malformed, unexpected, multipart
        self.refused_registrations = 0  # RegisterRank without this daemon's token
        self.dropped_replies = 0  # replies ZeroMQ would not queue (unroutable ones it drops)
        self.failed_frames = 0  # frames whose handling raised (a bug, not the sender's fault)
        self.oversized_frames = 0  # of bad_frames: messages of more than max_frame_bytes
        self._log = RateLimitedLog(log)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvferry-bootstrap", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the serving thread runs (the daemon is broken without it)."""
        return self._thread.is_alive()

    def counters(self) -> dict[str, int]:
        """What the server refused or failed since it started, by kind (for /status, /metrics);
        read without a lock: each is one int the serving thread alone writes."""
        return {
            "bad_frames": self.bad_frames,
            "refused_registrations": self.refused_registrations,
            "dropped_replies": self.dropped_replies,
            "failed_frames": self.failed_frames,
            "oversized_frames": self.oversized_frames,
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        curve.close(self._context)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(100):
                continue
            try:
                self._serve_one()
            except Exception as exc:  # one frame must not stop the server for everyone
                self.failed_frames += 1
                self._log.warning(
                    "failed", "bootstrap frame failed: %s: %s", type(exc).__name__, exc
                )

    def _serve_one(self) -> None:
        identity, frame, parts, size = self._receive()
        if parts != 1:
            self.bad_frames += 1
            error = multipart_error(parts, size, self.codec.max_frame_bytes)
            self.oversized_frames += isinstance(error, FrameTooLarge)
            reply = ErrorReply(str(error))
        else:
            reply = self._handle(frame.bytes, _peer_address(frame))
        try:
            self._socket.send_multipart([identity, self.codec.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:  # the sender is gone or not draining: the reply is dropped
            self.dropped_replies += 1

    def _receive(self) -> tuple[bytes, zmq.Frame | None, int, int]:
        """(sender identity, first message part, number of parts, their bytes). Parts after
        the first are read one at a time and dropped, so a long multipart message is never
        held whole."""
        part = self._socket.recv(copy=False, flags=zmq.NOBLOCK)
        identity, first, parts, size = part.bytes, None, 0, 0
        while part.more:
            part = self._socket.recv(copy=False)
            parts, size = parts + 1, size + len(part)
            if first is None:
                first = part
        return identity, first, parts, size

    def _handle(self, frame: bytes, peer: str) -> Message:
        try:
            message = self.codec.decode(frame)
            if isinstance(message, RegisterRank):
                return self._register(message, peer)
            if isinstance(message, QueryPeers):
                return self._peers()
            if isinstance(message, SubmitPrompt) and self.on_submit is not None:
                return self._submit(message, peer)
            raise WireError(f"unexpected {type(message).__name__} at the bootstrap server")
        except WireError as exc:
            self.bad_frames += 1
            self.oversized_frames += isinstance(exc, FrameTooLarge)
            self._log.warning("bad", "bad bootstrap frame from %s: %s", peer, exc)
            return ErrorReply(str(exc))

    def _register(self, message: RegisterRank, peer: str) -> Message:
        if not hmac.compare_digest(message.token, self.token):
            self.refused_registrations += 1
            self._log.warning("token", "refused a rank registration from %s: wrong token", peer)
            return ErrorReply("registration refused: the token is not this daemon's")
        info = message.info
        layout = info.layout
        if layout.tp_size != self.tp_size:
            return ErrorReply(
                f"rank registers tp_size={layout.tp_size}, the group has {self.tp_size}"
            )
        for other in self.ranks.values():
            mismatch = other.layout.mismatch(layout)
            if mismatch or other.layout.page_size != layout.page_size:
                return ErrorReply(
                    f"rank {layout.tp_rank} disagrees with its group: {mismatch or 'page_size'}"
                )
        self.ranks[layout.tp_rank] = info  # a restarted rank replaces its old entry
        return Ack()

    def _submit(self, message: SubmitPrompt, peer: str) -> Message:
        try:
            return self.on_submit(message, peer)
        except Exception as exc:  # the daemon's bug must not take the server down
            self.failed_frames += 1
            self._log.warning("submit", "submit of room %d failed: %r", message.room, exc)
            return ErrorReply(f"prefill could not take the prompt: {exc}", room=message.room)

    def _peers(self) -> Message:
        if len(self.ranks) < self.tp_size:
            return ErrorReply(
                f"{len(self.ranks)} of {self.tp_size} prefill ranks registered so far"
            )
        load = None
        if self.load is not None:
            try:
                load = self.load()
            except Exception as exc:  # the daemon's bug: answer without a load
                self._log.warning("load", "reading the load failed: %r", exc)
        return Peers([self.ranks[r] for r in range(self.tp_size)], load)


def _peer_address(frame: zmq.Frame) -> str:
    """The sender's network address (its host, as ZeroMQ saw the connection)."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:  # transports without one (inproc)
        return "unknown"
