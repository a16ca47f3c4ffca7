"""One tensor-parallel rank of a daemon, in its own process.

Rank 0 takes the daemon's commands and broadcasts them at the start of each step; every rank
then applies them and runs the same engine step (the model's all-reduces keep them in step,
`TPGroup.verdicts` agrees on transfer outcomes). Rank 0 reports its engine's output; every rank
reports a `Snapshot` twice a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from kvferry.daemon.engine.builder import EngineSettings, build_engine
from kvferry.daemon.engine.group import TPGroup
from kvferry.daemon.engine.outputs import StepOutput, TokenOutput
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.tokenizer import load_tokenizer
from kvferry.daemon.model.weights import full_weights, random_weights
from kvferry.daemon.server import protocol
from kvferry.daemon.server.config import DaemonConfig
from kvferry.daemon.server.heap import GCPauses, freeze
from kvferry.daemon.server.model_fit import transfer_for
from kvferry.daemon.server.rank_setup import join_group, model_all_reduce, rank_device
from kvferry.transport.bell import drain
from kvferry.transport.curve import CurveKeys
from kvferry.transport.failure import Failure, FailureKind

log = logging.getLogger(__name__)
SNAPSHOT_S = 0.5
STOP_DRAIN_S = 5.0  # at stop: time for aborts to reach the peers


def worker_main(
    config: DaemonConfig,
    rank: int,
    dist_address: str,
    bootstrap: str | None,
    token: bytes,
    conn,
    bell=(None, None),
    keys: CurveKeys | None = None,
    links: dict | None = None,
):
    """Process entry point: build the rank, report Ready (or Fatal), serve until Stop. A prefill
    rank registers with the bootstrap server at `bootstrap` showing `token`. `bell`: (the end
    rank 0 sleeps on, the end the other ranks ring) of a pipe, the one this rank uses set.
    `keys`: the deployment's CURVE pair (None: plain ZeroMQ). `links`: {peer rank: this rank's
    end of their pipe} (daemon/engine/links.py), for the group's exchanges; None: over gloo."""
    # the daemon decides when its ranks stop (a terminal's Ctrl-C reaches the whole group)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("KVFERRY_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s {config.name or config.role}[{rank}] %(levelname)s %(message)s",
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, config.tp)))
    try:
        worker = Worker(config, rank, dist_address, bootstrap, token, conn, bell, keys, links)
    except Exception as exc:
        log.exception("rank %d failed to start", rank)
        conn.send(protocol.Fatal(rank, f"rank {rank} failed to start: {exc}"))
        raise SystemExit(1) from None
    freeze(f"rank {rank}", worker.gc_pauses)  # its model, engine, graphs: out of every pass
    conn.send(protocol.RankReady(rank))
    try:
        worker.run()
    except (BrokenPipeError, EOFError, ConnectionResetError):
        log.error("rank %d: the daemon went away", rank)
        raise SystemExit(1) from None
    except Exception as exc:
        log.exception("rank %d failed", rank)
        with contextlib.suppress(OSError):  # through the lock: the transfer thread still runs
            worker.send(protocol.Fatal(rank, f"rank {rank} failed: {type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        worker.close()


class TransferThreadDied(RuntimeError):
    """The rank's transfer loop has stopped on its own."""


class Worker:
    def __init__(
        self,
        config: DaemonConfig,
        rank: int,
        dist_address: str,
        bootstrap: str | None,
        token: bytes,
        conn,
        bell=(None, None),
        keys: CurveKeys | None = None,
        links: dict | None = None,
    ) -> None:
        self.config, self.rank, self.conn = config, rank, conn
        self.device = rank_device(config, rank)
        self.group = join_group(config, rank, dist_address, self.device, links)
        self.engine = _build_engine(config, rank, self.device, self.group, bootstrap, (token, keys))
        self.agent = self.engine.agent
        # the transfer thread sends too (a TP1 decode rank's first tokens): one message at a time
        self._sending = threading.Lock()
        if config.role == "decode":  # taken by an engine alone on its group (TP1)
            self.engine.report_first = self._send_first_token
        # Rank 0 sleeps until a command comes, a room of any rank changes state (its own bell,
        # and the other ranks' rings on the group's pipe) or the next snapshot is due.
        self._woken, wake = bell
        if self._woken is not None:
            os.set_blocking(self._woken.fileno(), False)
        if wake is not None:
            self.agent.bell.forward_to(wake.fileno())
            self._wake = wake  # keeps the pipe open
        self._next_snapshot = 0.0
        self.gc_pauses = GCPauses()  # timed once the rank is ready (worker_main)

    def run(self) -> None:
        stop_at = None
        while True:
            self._check_transfer_thread()
            commands = self.group.broadcast(self._take_commands() if self.group.leader else None)
            for command in commands:
                if not isinstance(command, protocol.Stop):
                    self._apply(command)
                elif stop_at is None:  # a later Stop changes nothing: the drain runs already
                    stop_at = time.monotonic() + STOP_DRAIN_S
                    self._abort_all(command.reason)
            forwarded = self.engine.step(before_forward=self._send_progress)
            self._report()
            if stop_at is not None:
                done = self.group.broadcast(not self.engine.busy or time.monotonic() > stop_at)
                if done:
                    return
            if not forwarded and self.group.leader:
                self._wait()

    def _check_transfer_thread(self) -> None:
        """Without its transfer thread no KV moves: the rank ends (Fatal), and with it the
        daemon, rather than fail every request while looking alive."""
        failure = self.agent.thread_failure
        if failure is not None:
            raise TransferThreadDied(f"the {failure}")

    def close(self) -> None:
        self.agent.close()
        if self.group.links is not None:
            self.group.links.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _take_commands(self) -> list:
        commands = []
        while self.conn.poll():
            commands.append(self.conn.recv())
        return commands

    def _wait(self) -> None:
        sources = [self.conn, self.agent.bell]
        if self._woken is not None:
            sources.append(self._woken)
        wait(sources, max(self._next_snapshot - time.monotonic(), 0.0))
        self.agent.bell.clear()
        if self._woken is not None and not drain(self._woken.fileno()):
            self._woken = None  # every other rank has gone: their exit shows elsewhere

    def _apply(self, command) -> None:
        engine = self.engine
        if isinstance(command, protocol.AbortRoom):
            engine.abort(command.room, command.failure)
            return
        if isinstance(command, protocol.ForgetPrefill):  # decode only: before later rooms
            self.agent.directory.expect(command.bootstrap, command.incarnation)
            return
        try:
            if self.config.role == "decode":
                engine.submit(
                    command.room, command.prompt, command.params, command.bootstrap, command.retry
                )
            else:
                engine.submit(command.room, command.prompt, command.params)
        except ValueError as exc:  # the same on every rank: the request cannot be served
            self.engine.refuse(command.room, Failure(FailureKind.INVALID_REQUEST, str(exc)))

    def _abort_all(self, reason: str) -> None:
        for room in self.engine.live_rooms():
            self.engine.abort(room, Failure(FailureKind.UNAVAILABLE, reason))

    def send(self, message) -> None:
        """Send `message` to the daemon, from any of the rank's threads."""
        with self._sending:
            self.conn.send(message)

    def _send_first_token(self, output: TokenOutput) -> None:
        """A room's first token, from the transfer thread as the room succeeds: the daemon's
        reader takes every message as it comes, so the pipe has room for it."""
        self.send(StepOutput(outputs=[output]))

    def _send_progress(self) -> None:
        """Hand the daemon what the engine has for it (tokens, reservations, finished rooms)."""
        progress = self.engine.take_output()
        if self.group.leader and (progress.outputs or progress.reserved or progress.done):
            self.send(progress)

    def _report(self) -> None:
        self._send_progress()
        now = time.monotonic()
        if now >= self._next_snapshot:
            self._next_snapshot = now + SNAPSHOT_S
            self.send(self._snapshot())

    def _snapshot(self) -> protocol.Snapshot:
        engine, agent = self.engine, self.agent.stats()
        blocks = engine.runner.blocks
        samples = engine.samples.take()
        return protocol.Snapshot(
            rank=self.rank,
            rooms=agent.rooms,
            ring_used=agent.ring_used,
            ring_capacity=agent.ring_capacity,
            ring_high_water=agent.ring_high_water,
            kv_pages_used=blocks.used_pages,
            kv_pages_total=blocks.num_pages,
            queues=engine.queues(),
            bytes_sent=agent.bytes_sent,
            bytes_received=agent.bytes_received,
            messages_sent=agent.messages_sent,
            messages_received=agent.messages_received,
            ring_waits=agent.ring_waits,
            ring_wait_s=agent.ring_wait_s,
            bad_frames=agent.bad_frames,
            internal_errors=agent.internal_errors,
            failures=agent.failures,
            peers=agent.peers,
            forward_s=samples.forward_s,
            transfer_s=samples.transfer_s,
            rooms_succeeded=agent.rooms_succeeded,
            transfer_cpu_s=agent.transfer_cpu_s,
            loop_turns=agent.loop_turns,
            loop_timer_turns=agent.loop_timer_turns,
            loop_quiet_turns=agent.loop_quiet_turns,
            loop_sleep_events=agent.loop_sleep_events,
            loop_wakes=agent.loop_wakes,
            wait_cpu_s=agent.wait_cpu_s,
            ucx_cpu_s=agent.ucx_cpu_s,
            receives_ahead=agent.receives_ahead,
            engine_cpu_s=time.thread_time(),
            graph_forwards=engine.runner.graph_forwards,
            kv_pool_bytes=engine.runner.kv.numel() * engine.runner.kv.element_size(),
            memory_peak=_memory_peak(engine.runner.kv.device),
            control_address=agent.control_address,
            limit_refusals=agent.limit_refusals,
            native_data_path=int(agent.native_data_path),
            pid=os.getpid(),
            gc_pauses=self.gc_pauses.take(),
        )


def _memory_peak(device: torch.device) -> int:
    """Peak bytes the torch allocator has held on the rank's GPU; the staging ring (its own
    allocation) is reported separately as the ring capacity."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _build_engine(config: DaemonConfig, rank: int, device, group: TPGroup, bootstrap, secrets):
    """`secrets`: (the daemon's registration token, the deployment's CURVE pair or None)."""
    from kvferry.transport.ucx import UcxDataPlane

    model = _load_model(config, rank, device, group)
    eos = frozenset()
    if config.role == "decode":  # before the agent starts, so that a bad tokenizer leaks nothing
        eos = load_tokenizer(config.model.checkpoint(), model.config.eos_token_ids).eos_ids
    cuda = device.index if device.type == "cuda" else None
    return build_engine(
        config.role,
        model,
        EngineSettings(
            page_size=config.cache.page_size,
            num_pages=config.cache.num_pages,
            prefill_chunk_tokens=config.scheduler.prefill_chunk_tokens,
            max_batch_tokens=config.scheduler.max_batch_tokens,
            max_running=config.scheduler.max_running,
            cuda_graphs=config.engine.cuda_graphs,
            unregistered_prefill_tokens=config.scheduler.unregistered_tokens(),
        ),
        transfer_for(config, model.config),
        lambda: UcxDataPlane(
            config.transfer.ucx_tls,
            cuda,
            config.transfer.host,
            config.transfer.ucx_ports,
            config.transfer.native_ucx,
        ),
        model_name=config.model.name,
        tp_rank=rank,
        group=group,
        bootstrap=bootstrap,
        token=secrets[0],
        keys=secrets[1],
        eos_ids=eos,
    )


def _load_model(config: DaemonConfig, rank: int, device: torch.device, group: TPGroup) -> Model:
    model_config = config.model.model_config()
    path, seed = config.model.checkpoint(), config.model.seed
    weights = full_weights(model_config, path) if path else random_weights(model_config, seed)
    dtype = getattr(torch, config.model.dtype)
    return Model(
        model_config,
        weights,
        tp_size=config.tp,
        tp_rank=rank,
        dtype=dtype,
        device=str(device),
        kernels=None if config.engine.kernels else False,
        all_reduce=model_all_reduce(config, group, device, model_config.hidden_size, dtype),
    )
