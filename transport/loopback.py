"""An in-process data plane: a send copies the bytes into the receiving plane's queue, so unit
tests of everything above the data plane run without UCX."""

from __future__ import annotations

import threading
import uuid
from collections import deque
from typing import ClassVar

import torch

from kvferry.transport.bell import Bell
from kvferry.transport.dataplane import DataOp, DataPlane, DoneOp


class LoopbackDataPlane(DataPlane):
    """In-process data plane: a send copies the bytes into the receiving plane's queue."""

    _registry: ClassVar[dict[bytes, LoopbackDataPlane]] = {}
    _registry_lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__()
        self._address = f"loopback:{uuid.uuid4().hex}".encode()
        self._queue: deque[tuple[int, bytes]] = deque()
        self._lock = threading.Lock()
        self._arrived = Bell()  # rung by every send to this plane
        with self._registry_lock:
            self._registry[self._address] = self

    @property
    def address(self) -> bytes:
        return self._address

    @property
    def wake_fd(self) -> int:
        return self._arrived.fileno()

    def _progress(self) -> None:
        self._arrived.clear()

    def close(self) -> None:
        with self._registry_lock:
            self._registry.pop(self._address, None)
        self._arrived.close()
        super().close()

    def _connect(self, address: bytes, on_error):
        return address

    def _send(self, endpoint, buffer, tag, group) -> DataOp:
        with self._registry_lock:
            peer = self._registry.get(endpoint)
        if peer is None:
            return DoneOp(f"loopback peer {endpoint!r} is gone", peer_gone=True)
        payload = buffer.view(torch.uint8).cpu().numpy().tobytes()
        with peer._lock:
            peer._queue.append((tag, payload))
        peer._arrived.ring()  # a closed plane's bell stays silent
        return DoneOp()

    def _probe(self):
        with self._lock:
            if not self._queue:
                return None
            tag, payload = self._queue[0]
            return tag, len(payload)

    def _take(self, tag: int) -> bytes | None:
        with self._lock:
            for i, (queued_tag, payload) in enumerate(self._queue):
                if queued_tag == tag:
                    del self._queue[i]
                    return payload
        return None

    def _recv(self, tag, buffer, then) -> DataOp:
        payload = self._take(tag)
        if payload is None:
            return DoneOp(f"no message with tag {tag:#x}")
        nbytes = buffer.numel() * buffer.element_size()
        if len(payload) != nbytes:
            return DoneOp(f"message of {len(payload)} bytes, buffer of {nbytes} bytes")
        source = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        # straight from the host: a blocking copy_ is complete when it returns, where a copy
        # from a device tensor would only be queued on this thread's stream, unordered with
        # the copy stream's scatter of the same bytes
        buffer.view(torch.uint8).view(-1).copy_(source)
        return DoneOp()

    def _discard(self, tag) -> DataOp:
        self._take(tag)
        return DoneOp()
