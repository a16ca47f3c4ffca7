"""The receiving side of `bench/overlap.py`: a decode transfer agent with its own cache, in the
bench's process or in a process of its own (as in a deployment, where no decode rank shares a
process, or a GIL, with a prefill engine).

Both kinds take rooms (`open`), can be waited on (`fileno`: readable when a room may have
ended) and hand back the rooms that ended (`take_done`), each with its stage marks.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import numpy as np
import torch

from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.transport.config import TransferConfig
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.room import KVPoll


@dataclass
class Spec:
    """What a decode side is built from (picklable: it crosses to the child process)."""

    config: TransferConfig
    layout: KVLayout
    cache_shape: tuple[int, ...]
    dtype: str
    device: str
    tls: str


@dataclass
class Ended:
    room: int
    failure: str | None  # None: Success
    marks: dict[str, float] = field(default_factory=dict)


class LocalDecode:
    """The agent in this process."""

    def __init__(self, spec: Spec) -> None:
        from kvferry.transport.ucx import UcxDataPlane

        device = torch.device(spec.device)
        self.cache = torch.zeros(spec.cache_shape, dtype=getattr(torch, spec.dtype), device=device)
        cuda = (device.index or 0) if device.type == "cuda" else None
        self.agent = DecodeAgent(
            spec.config,
            spec.layout,
            KVPlanes.from_cache(self.cache),
            UcxDataPlane(spec.tls, cuda),
        )
        self._receivers: dict[int, object] = {}

    def open(self, room: int, slots: np.ndarray, bootstrap: str) -> None:
        self._receivers[room] = self.agent.receiver(room, slots, bootstrap)

    def fileno(self) -> int:
        return self.agent.bell.fileno()

    def take_done(self) -> list[Ended]:
        self.agent.bell.clear()
        ended = []
        for room, receiver in list(self._receivers.items()):
            state = receiver.poll()
            if state >= KVPoll.Success or state == KVPoll.Failed:
                failure = None if state == KVPoll.Success else str(receiver.failure)
                if failure is None:  # as a decode engine admits it: its stream after the KV
                    receiver.order_kv()
                ended.append(Ended(room, failure, dict(receiver.marks)))
                del self._receivers[room]
        return ended

    def close(self) -> None:
        self.agent.close()


class DecodeProcess:
    """The agent in a spawned process; the same interface over a pipe."""

    def __init__(self, spec: Spec) -> None:
        ctx = mp.get_context("spawn")
        self._conn, other = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(other, spec), daemon=True)
        self._proc.start()
        ready = self._conn.recv()
        if isinstance(ready, str):
            raise RuntimeError(f"the decode process failed to start:\n{ready}")

    def open(self, room: int, slots: np.ndarray, bootstrap: str) -> None:
        self._conn.send(("open", room, slots, bootstrap))

    def fileno(self) -> int:
        return self._conn.fileno()

    def take_done(self) -> list[Ended]:
        ended = []
        while self._conn.poll():
            news = self._conn.recv()
            if isinstance(news, str):
                raise RuntimeError(f"the decode process failed:\n{news}")
            ended += news
        return ended

    def close(self) -> None:
        self._conn.send(("close",))
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()


def _serve(conn, spec: Spec) -> None:
    """The child: a LocalDecode, its ended rooms sent to the parent as they end."""
    try:
        side = LocalDecode(spec)
        conn.send(True)
        while True:
            for ready in wait([conn, side]):
                if ready is side and (ended := side.take_done()):
                    conn.send(ended)
                elif ready is conn:
                    command = conn.recv()
                    if command[0] == "close":
                        side.close()
                        return
                    side.open(*command[1:])
    except Exception:
        conn.send(traceback.format_exc())
        raise
