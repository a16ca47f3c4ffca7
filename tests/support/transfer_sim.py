"""A prefill TP group and a decode TP group of transfer agents with CPU caches, for tests.

The prefill group holds one request's KV (random bits, in shuffled pages); the decode group
receives it into caches of another page size. `check()` says whether each decode rank holds
exactly the heads it owns.
"""

from __future__ import annotations

import random
import threading
import time

import torch

from kvferry.staging.layout import KVLayout
from kvferry.staging.plan import rank_heads
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.config import TransferConfig
from kvferry.transport.loopback import LoopbackDataPlane
from kvferry.transport.receiver import DecodeAgent
from kvferry.transport.room import KVPoll
from kvferry.transport.sender import PrefillAgent
from support.kvsim import PagedRank, bits, random_bits

FINISHED = (KVPoll.Success, KVPoll.Failed)


def layout_for(heads, tp, rank, layers=3, head_dim=8, page_size=16, mla=False, **changes):
    fields = dict(
        model="sim",
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        dtype="bfloat16",
        page_size=page_size,
        tp_size=tp,
        tp_rank=rank,
        mla=mla,
    )
    fields.update(changes)
    return KVLayout(**fields)


class Request:
    """One request's KV as the prefill group computed it."""

    def __init__(self, layout: KVLayout, num_tokens: int, seed: int, offset: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.offset = offset  # where in each rank's slot list the request's tokens start
        heads = 1 if layout.mla else layout.num_kv_heads
        self.kv = random_bits(
            (layout.num_planes, num_tokens, heads, layout.head_dim), torch.bfloat16, gen
        )
        self.room = random.Random(seed).getrandbits(64)
        self.num_tokens = num_tokens


class Group:
    """The agents of one side, each with a cache able to hold `capacity` tokens."""

    def __init__(
        self,
        role,
        heads,
        tp,
        config,
        bootstrap=None,
        token=b"",
        page_size=16,
        capacity=256,
        data_plane=LoopbackDataPlane,
        seed=0,
        device="cpu",
        **layout_changes,
    ):
        self.layouts = [
            layout_for(heads, tp, r, page_size=page_size, **layout_changes) for r in range(tp)
        ]
        self.caches = [
            PagedRank(
                lay.num_planes,
                capacity,
                lay.local_heads,
                lay.head_dim,
                torch.bfloat16,
                page_size,
                seed + r,
                device,
            )
            for r, lay in enumerate(self.layouts)
        ]
        if role == "prefill":
            self.agents = [
                PrefillAgent(config, lay, cache.planes, data_plane(), bootstrap, token)
                for lay, cache in zip(self.layouts, self.caches, strict=True)
            ]
        else:
            self.agents = [
                DecodeAgent(config, lay, cache.planes, data_plane())
                for lay, cache in zip(self.layouts, self.caches, strict=True)
            ]

    def heads_of(self, rank):
        lay = self.layouts[rank]
        return range(1) if lay.mla else rank_heads(lay.num_kv_heads, lay.tp_size, rank)

    def close(self):
        for agent in self.agents:
            agent.close()


def req_slots(cache: PagedRank, req: Request):
    return cache.slots[req.offset : req.offset + req.num_tokens]


def prefill_fill(group: Group, req: Request) -> None:
    for r, cache in enumerate(group.caches):
        held = group.heads_of(r)
        index = torch.from_numpy(req_slots(cache, req)).to(cache.cache.device)
        cache.cache[:, index] = req.kv[:, :, held.start : held.stop].to(cache.cache.device)


def start_senders(group: Group, req: Request, step=7, first_token=42):
    senders = []
    for agent, cache in zip(group.agents, group.caches, strict=True):
        sender = agent.sender(req.room, req.num_tokens)
        slots = req_slots(cache, req)
        for start in range(0, req.num_tokens, step):
            end = min(start + step, req.num_tokens)
            last = end == req.num_tokens
            sender.add_tokens(
                slots[start:end], first_token=first_token if last else None, last=last
            )
        senders.append(sender)
    return senders


def start_receivers(group: Group, req: Request, bootstrap: str):
    return [
        agent.receiver(req.room, req_slots(cache, req), bootstrap)
        for agent, cache in zip(group.agents, group.caches, strict=True)
    ]


def wait_all(handles, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [h.poll() for h in handles]
        if all(s in FINISHED for s in states):
            return states
        time.sleep(0.005)
    return [h.poll() for h in handles]


def decode_matches(group: Group, req: Request) -> bool:
    for r, cache in enumerate(group.caches):
        held = group.heads_of(r)
        got = cache.cache[:, torch.from_numpy(req_slots(cache, req)).to(cache.cache.device)].cpu()
        if not torch.equal(bits(got), bits(req.kv[:, :, held.start : held.stop])):
            return False
    return True


def wait_for(predicate, timeout_s=10.0) -> bool:
    """True once `predicate()` is, False if it is not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def settle(agents, turns=3, timeout_s=10.0) -> bool:
    """True once every agent's loop has run everything posted before this call and taken
    `turns` more turns: what those calls set off has had its chance to happen."""
    for _ in range(turns):
        ran = [threading.Event() for _ in agents]
        for agent, event in zip(agents, ran, strict=True):
            agent.post(event.set)
        deadline = time.monotonic() + timeout_s
        if not all(event.wait(max(deadline - time.monotonic(), 0)) for event in ran):
            return False
    return True


def wait_idle(groups, timeout_s=10.0) -> bool:
    """Every agent's ring back to empty (resources of finished rooms released)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rings = [a.ring for g in groups for a in g.agents if a.ring is not None]
        if all(ring.used_bytes == 0 for ring in rings):
            for ring in rings:
                ring.check()
            return True
        time.sleep(0.01)
    return False


def small_config(**changes) -> TransferConfig:
    fields = dict(
        chunk_tokens=16,
        staging_bytes=1 << 20,
        bootstrap_timeout_s=5.0,
        transfer_timeout_s=20.0,
        ring_wait_timeout_s=5.0,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0,
    )
    fields.update(changes)
    return TransferConfig(**fields)


class Deployment:
    """Bootstrap server + prefill group + decode group, all in this process."""

    def __init__(self, heads, src_tp, dst_tp, config=None, **kw):
        self.config = config or small_config()
        self.server = BootstrapServer(src_tp)
        prefill_kw = {k[2:]: v for k, v in kw.items() if k.startswith("p_")}
        decode_kw = {k[2:]: v for k, v in kw.items() if k.startswith("d_")}
        shared = {k: v for k, v in kw.items() if not k.startswith(("p_", "d_"))}
        self.prefill = Group(
            "prefill",
            heads,
            src_tp,
            self.config,
            self.server.address,
            self.server.token,
            **shared,
            **prefill_kw,
        )
        self.decode = Group("decode", heads, dst_tp, self.config, seed=100, **shared, **decode_kw)

    def run(self, num_tokens, seed=1, step=7, offset=0):
        req = Request(self.prefill.layouts[0], num_tokens, seed, offset)
        prefill_fill(self.prefill, req)
        receivers = start_receivers(self.decode, req, self.server.address)
        senders = start_senders(self.prefill, req, step=step)
        return req, senders, receivers

    def close(self):
        self.decode.close()
        self.prefill.close()
        self.server.close()


def count_calls(obj, name: str) -> list[int]:
    """Count the calls of `obj`'s method `name` from now on: [count], read as it grows."""
    calls, method = [0], getattr(obj, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return method(*args, **kwargs)

    setattr(obj, name, counted)
    return calls
