"""A daemon's rank worker processes: spawned, watched, told what to do, and stopped.

Commands go to rank 0 (which broadcasts them); every rank's reports come back over its own
pipe. A rank that reports Fatal or exits on its own is a failure of the whole daemon.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from kvferry.daemon.engine.links import close_links, make_links
from kvferry.daemon.server import protocol
from kvferry.daemon.server.config import DaemonConfig
from kvferry.daemon.server.worker import worker_main
from kvferry.transport.curve import CurveKeys

log = logging.getLogger("kvferry.daemon")
EXIT_S = 15.0  # after Stop: how long the ranks get to exit before they are killed
# The ranks' OpenMP threads (torch's CPU ops) sleep between parallel regions instead of spinning
# for a while first, unless the environment sets either knob. Spinning pays only on cores nobody
# else wants; a CPU deployment's daemons share the host's cores (each rank sizes its pool to
# them), and a spinning pool burns the cores the other processes' forwards wait for
# (`bench/omp_wait.py` runs the embedded default both ways).
OMP_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


class RankFailed(RuntimeError):
    """A rank reported Fatal or exited on its own."""


class Ranks:
    def __init__(
        self,
        config: DaemonConfig,
        name: str,
        bootstrap: str | None,
        token: bytes,
        keys: CurveKeys | None = None,
    ) -> None:
        """`token`: what a prefill rank shows the bootstrap server at `bootstrap` to register;
        it travels in the spawn arguments (pickled over a pipe), never in the environment or
        argv, as do `keys` (the deployment's CURVE pair)."""
        ctx = mp.get_context("spawn")
        if not any(knob in os.environ for knob in OMP_KNOBS):  # the spawned ranks inherit it
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        # The ranks meet through a file store: no port to pick, so nothing to race for.
        self._rendezvous = tempfile.mkdtemp(prefix=f"kvferry-{name}-")
        dist_address = f"file://{self._rendezvous}/store"
        self.procs, self.conns = [], []
        self._send_lock = threading.Lock()  # sends come from HTTP and bootstrap threads too
        # every rank rings rank 0 when one of its rooms changes state: rank 0 sleeps on this
        woken, wake = ctx.Pipe(duplex=False)
        # a pipe between every two ranks: their per-step exchanges and barriers
        links = make_links(ctx, config.tp)
        for rank in range(config.tp):
            parent, child = ctx.Pipe()
            bell = (woken if rank == 0 else None, wake if rank > 0 else None)
            if config.tp == 1:  # no other rank to hear (and a pipe nobody writes reads as EOF)
                bell = (None, None)
            proc = ctx.Process(
                target=worker_main,
                args=(config, rank, dist_address, bootstrap, token, child, bell, keys, links[rank]),
                name=f"{name}-rank{rank}",
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        woken.close()
        wake.close()
        close_links(links)

    def wait_ready(self, timeout_s: float, stopping: Callable[[], str | None]) -> None:
        """Until every rank reported Ready; raises when one fails, on timeout or a stop."""
        pending = set(range(len(self.procs)))
        deadline = time.monotonic() + timeout_s
        while pending:
            if stopping():
                raise RuntimeError(f"stopped while starting ({stopping()})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(pending)} not ready within {timeout_s:g}s")
            for rank, conn in enumerate(self.conns):
                while conn.poll():
                    message = conn.recv()
                    if isinstance(message, protocol.Fatal):
                        raise RankFailed(message.error)
                    if isinstance(message, protocol.RankReady):
                        pending.discard(rank)
            for rank, proc in enumerate(self.procs):
                if rank in pending and not proc.is_alive():
                    raise RankFailed(f"rank {rank} exited with code {proc.exitcode} at start")
            self._wait(min(left, 0.05))

    def send(self, command) -> None:
        """To rank 0; a rank 0 that is gone shows up in `take_reports`."""
        with self._send_lock:
            try:
                self.conns[0].send(command)
            except (OSError, ValueError) as exc:
                log.warning("could not reach rank 0: %s", exc)

    def take_reports(self, handle: Callable[[object], None], timeout_s: float) -> None:
        """Wait up to `timeout_s` for reports and hand each to `handle`; RankFailed when a rank
        reported Fatal or exited."""
        ready = self._wait(timeout_s)
        for conn in self.conns:
            if conn in ready:
                self._read(conn, handle)
        for rank, proc in enumerate(self.procs):
            if proc.sentinel in ready:
                proc.join(1)
                raise RankFailed(f"rank {rank} exited with code {proc.exitcode}")

    def join(self, handle: Callable[[object], None]) -> bool:
        """After Stop: wait for every rank to exit, still taking their reports (the ends of the
        requests they aborted); kill the late. True when all exited 0."""
        deadline = time.monotonic() + EXIT_S
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            self._wait(0.05)
            for conn in self.conns:
                with contextlib.suppress(OSError, RankFailed):
                    self._read(conn, handle)
        self.kill()
        return all(proc.exitcode == 0 for proc in self.procs)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                log.warning("%s did not exit in time; killed", proc.name)
                proc.kill()
            proc.join(5)
        shutil.rmtree(self._rendezvous, ignore_errors=True)

    def _read(self, conn, handle) -> None:
        while conn.poll():
            try:
                message = conn.recv()
            except EOFError:
                return  # the rank's exit shows through its sentinel
            if isinstance(message, protocol.Fatal):
                log.error("%s", message.error)
                raise RankFailed(message.error)
            handle(message)

    def _wait(self, timeout_s: float) -> list:
        return wait(self.conns + [p.sentinel for p in self.procs], timeout=timeout_s)
