"""Bootstrap server (hosted by the prefill side): where decode ranks find the prefill ranks.

Prefill ranks register their layout, UCX address and control address; decode ranks ask for
the full set, which is answered once every rank of the prefill TP group has registered. A
prefill daemon also takes prompts here (`SubmitPrompt`, handed to `on_submit`). Any malformed
or unexpected frame gets an ErrorReply and is counted; the server keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import zmq

from kvferry.transport.messages import (
    Ack,
    Codec,
    ErrorReply,
    Peers,
    QueryPeers,
    RankInfo,
    RegisterRank,
    SubmitPrompt,
    WireError,
)

log = logging.getLogger(__name__)


class BootstrapServer:
    """Serves one prefill TP group of `tp_size` ranks on its own thread."""

    def __init__(
        self,
        tp_size: int,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_bytes: int = 1 << 20,
        on_submit: Callable[[SubmitPrompt], Ack | ErrorReply] | None = None,
    ) -> None:
        self.tp_size, self.on_submit = tp_size, on_submit
        self.codec = Codec(max_frame_bytes)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes * 16)
        if port:
            self._socket.bind(f"tcp://{host}:{port}")
        else:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.ranks: dict[int, RankInfo] = {}
        self.bad_frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvferry-bootstrap", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        self._context.term()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(100):
                continue
            parts = self._socket.recv_multipart()
            reply = self._handle(parts[1:])
            self._socket.send_multipart([parts[0], self.codec.encode(reply)])

    def _handle(self, frames: list[bytes]):
        try:
            if len(frames) != 1:
                raise WireError(f"expected 1 frame, got {len(frames)}")
            message = self.codec.decode(frames[0])
            if isinstance(message, RegisterRank):
                return self._register(message.info)
            if isinstance(message, QueryPeers):
                return self._peers()
            if isinstance(message, SubmitPrompt) and self.on_submit is not None:
                return self._submit(message)
            raise WireError(f"unexpected {type(message).__name__} at the bootstrap server")
        except WireError as exc:
            self.bad_frames += 1
            return ErrorReply(str(exc))

    def _register(self, info: RankInfo):
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

    def _submit(self, message: SubmitPrompt):
        try:
            return self.on_submit(message)
        except Exception as exc:  # the daemon's bug must not take the server down
            log.exception("submit of room %d failed", message.room)
            return ErrorReply(f"prefill could not take the prompt: {exc}", room=message.room)

    def _peers(self):
        if len(self.ranks) < self.tp_size:
            return ErrorReply(
                f"{len(self.ranks)} of {self.tp_size} prefill ranks registered so far"
            )
        return Peers([self.ranks[r] for r in range(self.tp_size)])
