"""Every daemon and rank process of a deployment, measured when first seen (the start, or just
after its restart) and at the end: resident memory, open file descriptors, threads. The pids come
from the daemons' answers (/health, /status) as for the fuzzer."""

from __future__ import annotations

import threading
import time

import msgspec

from kvferry.daemon.cli.client import ClientError
from kvferry.daemon.cli.fuzz.targets import ProcessFigures, discover, measure
from kvferry.daemon.server.config import Deployment

SETTLE_S = 120.0  # the most the end of a soak waits for every daemon to answer /health


class ProcessRecord(msgspec.Struct, kw_only=True):
    name: str  # "prefill-0", "prefill-0 rank 1"
    pid: int
    start: ProcessFigures
    # at the end, or (a replaced incarnation) just before its daemon was restarted
    end: ProcessFigures | None = None
    alive_at_end: bool = True


class Processes:
    """The processes seen so far, one record per pid."""

    def __init__(self, deployment: Deployment) -> None:
        self._deployment = deployment
        self._lock = threading.Lock()  # the restart thread adds, the main thread reads
        self.records: dict[int, ProcessRecord] = {}

    def look(self) -> bool:
        """Measures the processes not seen before; False when a daemon cannot say its pids
        now (a decode daemon answers 503 until it has found its restarted prefill again)."""
        try:
            processes = discover(self._deployment).processes
        except ClientError:
            return False
        for process in processes:
            with self._lock:
                if process.pid not in self.records:
                    figures = measure(process.pid)
                    self.records[process.pid] = ProcessRecord(
                        name=process.name, pid=process.pid, start=figures
                    )
        return True

    def before_restart(self, name: str) -> None:
        """Measures the processes of daemon `name` before it is stopped: its incarnation's
        end figures."""
        with self._lock:
            records = [r for r in self.records.values() if r.name.split(" rank ")[0] == name]
        for record in records:
            figures = measure(record.pid)
            if figures.alive:
                record.end = figures

    def finish(self) -> tuple[list[ProcessRecord], list[ProcessRecord]]:
        """Measures every process seen: (those serving now, those replaced by a restart)."""
        current = {p.pid for p in self._settled().processes}
        with self._lock:
            records = list(self.records.values())
        for record in records:
            figures = measure(record.pid)
            record.alive_at_end = figures.alive
            if record.end is None or record.pid in current:
                record.end = figures
        return (
            [r for r in records if r.pid in current],
            [r for r in records if r.pid not in current],
        )

    def _settled(self):
        """The deployment's processes once every daemon answers /health again (a restart just
        before the end may leave one looking for its peer)."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            try:
                return discover(self._deployment)
            except ClientError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1.0)  # the daemons tell nobody when they are ready: ask again
