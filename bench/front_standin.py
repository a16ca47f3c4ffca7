"""The decode daemon as `bench/http_front.py` puts it behind its HTTP front: the daemon's side
of a request (`StandIn`: `generate`, `end`, `abort`, the reports taken as `Daemon._progress`
takes them) and, in place of the ranks, a process that steps the requests (`steps`).

The reports are read by a thread of their own, as the daemons read their ranks' reports, or on
the front's own event loop (`loop`: the pipe watched there, each report handed to the streams
in the thread that writes them), the way measured against it."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from types import SimpleNamespace

from kvferry.daemon.server.metrics import Metrics
from kvferry.daemon.server.request import Answering, DecodeRequest, Requests


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)


class StandIn:
    """The decode daemon as its HTTP front sees it, with a process stepping its requests in
    place of the ranks, its reports read as `reports` says: by a thread of their own (`thread`,
    the daemons' way) or on the front's loop (`loop`)."""

    def __init__(self, step_s: float, reports: str) -> None:
        self.config = SimpleNamespace(
            role="decode",
            model=SimpleNamespace(name="bench"),
            http_max_body_bytes=1 << 24,
            http_body_timeout_s=30.0,
            http_max_requests_per_client=1 << 16,
            api_key_file=None,
            api_key_env=None,
        )
        self.metrics = Metrics("decode", "bench")
        self.tokenizer, self.chat_template = Tokenizer(), None
        self.started = time.time()
        self.requests, self.answering = Requests(), Answering()
        ctx = multiprocessing.get_context("spawn")
        self._conn, rank_end = ctx.Pipe()
        self._rank = ctx.Process(target=steps, args=(rank_end, step_s), daemon=True)
        self._rank.start()
        rank_end.close()
        self._send_lock = threading.Lock()
        self._reports = reports
        self._stopped, self._stop = ctx.Pipe(duplex=False)  # ends the reader's wait
        self.reader: threading.Thread | None = None  # reads the reports, where `thread`
        self._loop: asyncio.AbstractEventLoop | None = None  # reads them, where `loop`

    def serve(self) -> None:
        """Read the reports from now on, as `reports` says (on the front's loop: from the
        first request on, which `generate` takes there)."""
        if self._reports == "thread":
            self.reader = threading.Thread(target=self._read, name="bench-reports", daemon=True)
            self.reader.start()

    def unserve(self) -> None:
        if self._loop is not None:
            done = threading.Event()

            def remove() -> None:
                self._loop.remove_reader(self._fd)
                done.set()

            self._loop.call_soon_threadsafe(remove)
            done.wait(5.0)
        if self.reader is not None:
            self._stop.send(None)
            self.reader.join()

    def _watch(self) -> None:
        """On the front's loop: read the reports there from now on."""
        self._loop, self._fd = asyncio.get_running_loop(), self._conn.fileno()
        with self._send_lock:  # uvloop makes what it watches non-blocking; a report is read whole
            self._loop.add_reader(self._fd, self._readable)
            os.set_blocking(self._fd, True)

    def _readable(self) -> None:
        while self._conn.poll():
            self._report(self._conn.recv())

    def generate(self, prompt, params, events) -> DecodeRequest:
        if self._reports == "loop" and self._loop is None:
            self._watch()
        request = DecodeRequest(0, prompt, params, "bench", events)
        request.deadline = request.created + 300.0
        self.requests.add(request)
        self._tell((request.room, params.max_tokens))
        return request

    def end(self, room: int) -> None:
        self.abort(room, None)

    def abort(self, room: int, failure) -> None:
        request = self.requests.get(room)
        if request is not None and self.requests.remove(request):
            request.finish, request.error = "abort", failure
            self._tell((room, 0))

    def close(self) -> None:
        self._tell(None)
        self._rank.join(10)

    def _tell(self, command) -> None:
        with self._send_lock:
            self._conn.send(command)

    def _read(self) -> None:
        """The reader thread: asleep until a report comes or `unserve` stops it."""
        while self._stopped not in multiprocessing.connection.wait([self._conn, self._stopped]):
            self._readable()

    def _report(self, outputs: list[tuple[int, int, bool]]) -> None:
        """A step's tokens, as `Daemon._progress` takes them."""
        now = time.monotonic()
        for room, token, last in outputs:
            request = self.requests.get(room)
            if request is None:
                continue
            request.take([token], now, self.metrics)
            if not last:
                request.events.put(([token], None))
            elif self.requests.remove(request):
                request.finish = "length"
                request.marks["done"] = time.time()
                request.events.put(([token], "length"))


def steps(conn, step_s: float) -> None:
    """Rank 0's stand-in, a process of its own: takes `(room, tokens)` (0 tokens: an abort;
    None: stop), and every `step_s` reports each room's next token, the last one marked."""
    left: dict[int, int] = {}
    next_step = time.monotonic() + step_s
    while True:
        if conn.poll(max(next_step - time.monotonic(), 0.0)):
            command = conn.recv()
            if command is None:
                return
            room, tokens = command
            if tokens:
                left[room] = tokens
            else:
                left.pop(room, None)
            continue
        next_step += step_s
        outputs = []
        for room in list(left):
            left[room] -= 1
            outputs.append((room, left[room] % 1000, left[room] == 0))
            if left[room] == 0:
                del left[room]
        if outputs:
            conn.send(outputs)
