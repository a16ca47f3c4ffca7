"""The two sides of bench/transfer.py, driven command by command: each rank in a process of its
own, as the daemons run them (`--layout rank`), every rank of a role in one process (`role`),
or everything in the bench's own process (`one`). The bootstrap server runs in the bench's
process."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import select
import time
import traceback

import numpy as np
import torch
from loop_profile import profile_loops  # bench/ is on sys.path (a script)

from kvferry.staging.kv_copy import KVPlanes
from kvferry.staging.layout import KVLayout
from kvferry.staging.slots import token_slots
from kvferry.transport.config import TransferConfig
from kvferry.transport.handles import KVReceiver
from kvferry.transport.room import KVPoll


class Side:
    """Ranks `ranks` of one role in this process, each with a cache of `args.tokens` tokens."""

    def __init__(
        self,
        role: str,
        args: dict,
        mode: str,
        ranks: list[int],
        bootstrap: str,
        token: bytes | None = None,
    ) -> None:
        from kvferry.transport.receiver import DecodeAgent
        from kvferry.transport.sender import PrefillAgent
        from kvferry.transport.ucx import UcxDataPlane

        a = argparse.Namespace(**args)
        self.args, self.role = a, role
        profile_loops(a.profile)
        self.device = torch.device(a.device)
        tp = a.src_tp if role == "prefill" else a.dst_tp
        config = TransferConfig(
            mode=mode,
            chunk_tokens=a.chunk,
            staging_bytes=a.staging_mib << 20,
            max_message_bytes=getattr(a, "max_message_bytes", 0),
            post_receives_ahead=getattr(a, "ahead", None),
            ucx_tls=a.tls,
            transfer_timeout_s=600,
            bootstrap_timeout_s=60,
        )
        cuda = self.device.index or 0 if self.device.type == "cuda" else None
        self.agents, self.slots = [], []
        for rank in ranks:
            # each rank's own pages, whichever process holds it
            rng = np.random.default_rng((1 if role == "prefill" else 2, rank))
            layout = KVLayout(
                model="bench",
                num_layers=a.layers,
                num_kv_heads=a.heads,
                head_dim=a.head_dim,
                dtype=a.dtype,
                page_size=a.page_size,
                tp_size=tp,
                tp_rank=rank,
            )
            pages = -(-a.tokens // a.page_size)
            shape = (layout.num_planes, pages * a.page_size, layout.local_heads, a.head_dim)
            cache = torch.randn(shape, device=self.device).to(getattr(torch, a.dtype))
            self.slots.append(token_slots(rng.permutation(pages), a.page_size, 0, a.tokens))
            plane = UcxDataPlane(a.tls, cuda, native=a.native)
            planes = KVPlanes.from_cache(cache)
            agent = (
                PrefillAgent(config, layout, planes, plane, bootstrap, token)
                if role == "prefill"
                else DecodeAgent(config, layout, planes, plane)
            )
            self.agents.append(agent)
        self.bootstrap = bootstrap
        self.handles = {}

    def open(self, room: int, tokens: int):
        """Decode: register the room with every prefill rank and wait until it is accepted."""
        self.handles[room] = [
            agent.receiver(room, slots[:tokens], self.bootstrap)
            for agent, slots in zip(self.agents, self.slots, strict=True)
        ]
        _wait(self.handles[room], KVPoll.WaitingForInput, self.agents)
        return self._counters()

    def send(self, room: int, tokens: int):
        """Prefill: hand the whole prompt's KV over at once; returns the hand-over time
        (monotonic, and wall-clock as the rooms' marks are)."""
        began = time.monotonic(), time.time()
        self.handles[room] = []
        for agent, slots in zip(self.agents, self.slots, strict=True):
            sender = agent.sender(room, tokens)
            sender.add_tokens(slots[:tokens], first_token=1, last=True)
            self.handles[room].append(sender)
        return began

    def wait(self, room: int):
        """Wait for Success everywhere, and on decode for the KV in the cache (its last scatter
        may still be queued at Success); (end time, messages received, bytes received, the
        room's marks: each stage's latest time over this side's ranks)."""
        _wait(self.handles[room], KVPoll.Success, self.agents)
        marks = {}
        for handle in self.handles[room]:
            if isinstance(handle, KVReceiver):
                handle.wait_kv()
                for stage, at in handle.marks.items():
                    marks[stage] = max(at, marks.get(stage, at))
        return (time.monotonic(), *self._counters(), marks)

    def _counters(self):
        stats = [a.stats() for a in self.agents]
        return (
            sum(s.messages_received + s.messages_sent for s in stats),
            sum(s.bytes_received for s in stats),
        )

    def stats(self):
        """Summed copy and wire seconds, loop turns and transfer-thread CPU seconds over this
        side's agents."""
        stats = [a.stats() for a in self.agents]
        keys = ("copy_s", "wire_s", "loop_turns", "loop_timer_turns", "loop_quiet_turns")
        keys += ("loop_sleep_events",)
        keys += ("transfer_cpu_s",)
        keys += ("wait_cpu_s", "ucx_cpu_s", "loop_wakes")
        return summed([{k: getattr(s, k) for k in keys} for s in stats])

    def raw_open(self, nbytes: int):
        """A bare UCX worker and a receive buffer of `nbytes`; returns the worker's address."""
        from kvferry.transport.ucx import UcxDataPlane

        cuda = self.device.index or 0 if self.device.type == "cuda" else None
        self.raw = UcxDataPlane(self.args.tls, cuda, native=False)  # raw ucxx, as ever
        self.raw_buffers = [
            torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            for _ in range(self.args.dst_tp)
        ]
        return self.raw.address

    def raw_send(self, address: bytes):
        endpoint = self.raw.endpoint(address, lambda why: None)
        began = time.monotonic()
        requests = [self.raw.send(endpoint, buf, tag) for tag, buf in enumerate(self.raw_buffers)]
        while not all(r.done() for r in requests):
            self.raw.progress()  # the ceiling: this thread does nothing but progress UCX
        return began

    def raw_recv(self):
        taken = []
        while len(taken) < len(self.raw_buffers):
            self.raw.progress()
            probed = self.raw.probe()
            if probed is not None:
                taken.append(self.raw.recv(probed[0], self.raw_buffers[probed[0]]))
        while not all(r.done() for r in taken):
            self.raw.progress()
        return time.monotonic()

    def close(self):
        if hasattr(self, "raw"):
            self.raw.close()
        for agent in self.agents:
            agent.close()


def _wait(handles, state, agents, timeout_s=600.0):
    """Until every handle reaches `state`, sleeping on the agents' bells (rung at every change
    of a room's state) as an engine does."""
    bells = [agent.bell for agent in agents]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for bell in bells:
            bell.clear()
        states = [h.poll() for h in handles]
        if KVPoll.Failed in states:
            raise RuntimeError(f"transfer failed: {[h.failure for h in handles]}")
        if all(s >= state for s in states):
            return
        select.select(bells, [], [], deadline - time.monotonic())
    raise TimeoutError(f"rooms did not reach {state.name}")


def child(conn, role, args, mode, ranks, bootstrap, token):
    try:
        side = Side(role, args, mode, ranks, bootstrap, token)
        conn.send(None)
        while True:
            name, params = conn.recv()
            if name == "close":
                side.close()
                conn.send(None)
                return
            conn.send(getattr(side, name)(*params))
    except Exception:
        conn.send(RemoteError(traceback.format_exc()))
        raise


class RemoteError(RuntimeError):
    pass


class Remote:
    """Ranks `ranks` of a role in a process of their own."""

    def __init__(self, role, args, mode, ranks, bootstrap, token=None):
        ctx = mp.get_context("spawn")
        self.conn, other = ctx.Pipe()
        self.role = role
        self.proc = ctx.Process(
            target=child,
            args=(other, role, vars(args), mode, ranks, bootstrap, token),
            daemon=True,
        )
        self.proc.start()

    def __call__(self, name, *params):
        self.ask(name, *params)
        return self.receive()

    def ask(self, name, *params):
        self.conn.send((name, params))

    def receive(self):
        if not self.conn.poll(900):
            raise TimeoutError(f"{self.role} process did not answer")
        reply = self.conn.recv()
        if isinstance(reply, RemoteError):
            raise reply
        return reply

    def close(self):
        if self.proc.is_alive():
            self.conn.send(("close", ()))
        self.proc.join(30)


class Local:
    """Ranks of a role in this process (--layout one)."""

    def __init__(self, role, args, mode, ranks, bootstrap, token=None):
        self.side = Side(role, vars(args), mode, ranks, bootstrap, token)
        self._reply = None

    def ask(self, name, *params):
        self._reply = getattr(self.side, name)(*params)

    def receive(self):
        return self._reply

    def close(self):
        self.side.close()


class Role:
    """Every rank of one role, in the processes `layout` puts them in; a command goes to all of
    them at once and their answers are merged (the earliest start, the latest end, the sums)."""

    def __init__(self, role, args, mode, bootstrap, token=None):
        ranks = list(range(args.src_tp if role == "prefill" else args.dst_tp))
        groups = [[r] for r in ranks] if args.layout == "rank" else [ranks]
        kind = Local if args.layout == "one" else Remote
        # started together: a prefill rank's start waits for its whole group to register
        self.parts = [kind(role, args, mode, group, bootstrap, token) for group in groups]
        for part in self.parts:
            part.receive()  # built

    def __call__(self, name, *params):
        for part in self.parts:
            part.ask(name, *params)
        return _merge(name, [part.receive() for part in self.parts])

    def close(self):
        for part in self.parts:
            part.close()


def summed(rows: list[dict]) -> dict:
    """Key-wise sums of `rows`; a dict value (turns by cause) is summed key-wise too."""
    values = {key: [row[key] for row in rows] for key in rows[0]}
    return {k: summed(v) if isinstance(v[0], dict) else sum(v) for k, v in values.items()}


def _merge(name, replies):
    if name == "send":
        return min(replies)
    if name == "wait":
        marks = {}
        for reply in replies:
            for stage, at in reply[3].items():
                marks[stage] = max(at, marks.get(stage, at))
        return (max(r[0] for r in replies), *(sum(r[i] for r in replies) for i in (1, 2)), marks)
    if name == "open":
        return tuple(sum(r[i] for r in replies) for i in (0, 1))
    if name == "stats":
        return summed(replies)
    [reply] = replies  # raw commands go to one process
    return reply
