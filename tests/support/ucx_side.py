"""One side (prefill or decode) of a deployment in its own process, over real UCX.

The test process drives it through a pipe: each command is (name, *args) and gets one reply.
"""

from __future__ import annotations

import functools
import select
import time
import traceback

from kvferry.transport.config import TransferConfig
from kvferry.transport.room import KVPoll
from support.transfer_sim import (
    Group,
    Request,
    decode_matches,
    prefill_fill,
    req_slots,
    start_receivers,
    start_senders,
    wait_all,
    wait_idle,
)

# The helpers of a child script that drives two data planes, `plane` and `peer` (which the script
# makes), from its one thread, with no transfer loop: prepend it to the script.
TWO_PLANES = r"""
import select, time

def progress():  # both workers progressed, then a sleep on their descriptors
    for p in (plane, peer):
        p.progress()
    if all(p.arm() for p in (plane, peer)):
        select.select([plane.wake_fd, peer.wake_fd], [], [], 1.0)

def wait(op):  # "unfinished" after 30 s, else the op's error (None: it succeeded)
    deadline = time.monotonic() + 30
    while not op.done() and time.monotonic() < deadline:
        progress()
    return "unfinished" if not op.done() else op.error()
"""


class Side:
    def __init__(self, role, heads, tp, config: dict, capacity=512, device="cpu", **layout):
        from kvferry.transport.bootstrap import BootstrapServer
        from kvferry.transport.ucx import UcxDataPlane

        self.config = TransferConfig(**config)
        self.server = BootstrapServer(tp) if role == "prefill" else None
        cuda = 0 if device == "cuda" else None
        plane = functools.partial(
            UcxDataPlane,
            self.config.ucx_tls,
            cuda,
            self.config.host,
            native=self.config.native_ucx,
        )
        bootstrap = self.server.address if self.server else None
        token = self.server.token if self.server else b""
        page = 16 if role == "prefill" else 4
        self.group = Group(
            role,
            heads,
            tp,
            self.config,
            bootstrap,
            token,
            page_size=page,
            capacity=capacity,
            data_plane=plane,
            seed=0 if role == "prefill" else 100,
            device=device,
            **layout,
        )
        self.handles: dict[int, list] = {}
        self.requests: dict[int, Request] = {}

    def ready(self):
        return self.server.address if self.server else "decode ready"

    def _request(self, seed, num_tokens, offset):
        req = self.requests.get(seed) or Request(self.group.layouts[0], num_tokens, seed, offset)
        self.requests[seed] = req
        return req

    def send(self, seed, num_tokens, offset=0, tokens=None, step=16):
        """Hand the prefill KV of request `seed` to the agents, `step` tokens at a time (only
        `tokens` of it if given)."""
        req = self._request(seed, num_tokens, offset)
        prefill_fill(self.group, req)
        if tokens is None:
            self.handles[seed] = start_senders(self.group, req, step=step)
        else:
            self.handles[seed] = []
            for agent, cache in zip(self.group.agents, self.group.caches, strict=True):
                sender = agent.sender(req.room, req.num_tokens)
                sender.add_tokens(req_slots(cache, req)[:tokens])
                self.handles[seed].append(sender)
        return True

    def more(self, seed, tokens):
        """Hand over the rest of request `seed` after its first `tokens` tokens."""
        req = self.requests[seed]
        for sender, cache in zip(self.handles[seed], self.group.caches, strict=True):
            sender.add_tokens(req_slots(cache, req)[tokens:], first_token=42, last=True)
        return True

    def recv(self, seed, num_tokens, offset, bootstrap):
        self.handles[seed] = start_receivers(
            self.group, self._request(seed, num_tokens, offset), bootstrap
        )
        return True

    def states(self, seed):
        return [int(h.poll()) for h in self.handles[seed]]

    def wait(self, seed, timeout_s=30.0):
        """(states, failure reasons, whether decode caches hold exactly the request's heads)."""
        states = [int(s) for s in wait_all(self.handles[seed], timeout_s)]
        matches = None
        if self.server is None and all(s == KVPoll.Success for s in states):
            for handle in self.handles[seed]:
                handle.wait_kv()  # a scatter may still be queued at Success
            matches = decode_matches(self.group, self.requests[seed])
        return states, [str(h.failure) for h in self.handles[seed]], matches

    def idle(self, timeout_s=10.0):
        """Whether every ring is back to empty and no native operation is left posted (a
        failed room's receives posted ahead, its notes' too, were cancelled); and the
        data-plane message count."""
        ok = wait_idle([self.group], timeout_s)
        deadline = time.monotonic() + timeout_s
        while ok and any(_posted(a.core.data) for a in self.group.agents):
            ok = time.monotonic() < deadline
            time.sleep(0.01)
        sent = sum(a.core.data.messages_sent for a in self.group.agents)
        received = sum(a.core.data.messages_received for a in self.group.agents)
        return ok, sent, received

    def stats(self):
        return [a.core.stats.__dict__ for a in self.group.agents]

    def inject(self, seed, piece, writer, scale):
        """Decode: send rank 0 a data message for (piece, writer) of request `seed`'s room,
        `scale` times the size it must have, from a rogue plane of this process."""
        import torch

        from kvferry.transport.tags import pack_tag
        from kvferry.transport.ucx import UcxDataPlane

        agent = self.group.agents[0]
        room = agent.rooms[self.requests[seed].room]
        sizes = {(p, w): n for p, w, _, n in room.messages(agent.planes)}
        nbytes = int(sizes[piece, writer] * scale)
        rogue = UcxDataPlane(self.config.ucx_tls, None, self.config.host, native=False)
        try:
            payload = torch.zeros(nbytes, dtype=torch.uint8)
            endpoint = rogue.endpoint(agent.core.data.address, lambda why: None)
            op = rogue.send(endpoint, payload, pack_tag(room.key, piece, writer))
            deadline = time.monotonic() + 20
            while not op.done() and time.monotonic() < deadline:
                rogue.progress()
                if rogue.arm():  # nothing pending: sleep until the worker has news
                    select.select([rogue.wake_fd], [], [], 0.1)
            return op.done()
        finally:
            rogue.close()

    def revoke_and_hold(self):
        """Decode: revoke rank 0's receives posted ahead, as a message that finds the ring full
        does, then hold its transfer thread (no progress, no probe) until `release`: messages
        sent meanwhile are in when it next progresses, together with the cancellations."""
        import threading

        self._held = threading.Event()
        agent = self.group.agents[0]
        hold = self._held

        def revoke_and_wait():
            agent.arrivals.cancel_ahead()
            hold.wait(20)

        agent.core.loop.post(revoke_and_wait)
        return True

    def release(self):
        self._held.set()
        return True

    def close(self):
        self.group.close()
        if self.server:
            self.server.close()
        return True


def _posted(data) -> int:
    """Native operations a rank's data plane has in flight (read from another thread: a
    glance at a count)."""
    native = getattr(data, "_native", None)
    return 0 if native is None else native.posted


def main(conn, role, heads, tp, config, layout) -> None:
    """Child process entry: build the side, then serve commands until 'close'."""
    try:
        side = Side(role, heads, tp, config, **layout)
        conn.send(("ok", side.ready()))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        name, args = conn.recv()
        try:
            conn.send(("ok", getattr(side, name)(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))
        if name == "close":
            time.sleep(0.1)
            return
