"""The tensor-parallel group of one daemon, as its engines see it.

Every rank runs the same engine on the same commands, so their schedulers stay in step. What
differs between ranks is each one's view of a room's transfer (rank 0's KV may land before rank
1's); decisions that depend on it are agreed here, with one small all-reduce per step, so that
all ranks admit, release or fail a request at the same step. Within a daemon these exchanges
go over the pipes between its ranks (links.py) where it has them. Time-based decisions (deadlines)
are taken by the daemon and arrive as commands, never from a rank's own clock.
"""

from __future__ import annotations

import enum

import torch
import torch.distributed as dist

from kvferry.daemon.engine.links import Links
from kvferry.transport.room import KVPoll


class Verdict(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"  # some rank's peers have not all registered the room yet
    WAIT = "wait"  # registered on every rank; some rank is still transferring
    SUCCESS = "success"  # every rank has its KV
    FAILED = "failed"  # some rank failed: every rank gives the room up


class TPGroup:
    """`size` ranks, whose step exchanges and barriers go over `links`, the pipes between the
    ranks (links.py), or else over `process_group`, a gloo group (host tensors)."""

    def __init__(
        self, size: int = 1, rank: int = 0, process_group=None, links: Links | None = None
    ) -> None:
        if size > 1 and process_group is None and links is None:
            raise ValueError(f"a group of {size} ranks needs a process group or links")
        self.size, self.rank, self.process_group, self.links = size, rank, process_group, links

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        if self.links is not None:
            return self.links.broadcast(obj)
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.process_group)
        return box[0]

    def barrier(self) -> None:
        """Return once every rank has called it."""
        if self.size == 1:
            return
        if self.links is not None:
            self.links.barrier()
        else:
            dist.barrier(group=self.process_group)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank."""
        return bool(self._any([[flag]])[0][0]) if self.size > 1 else flag

    def verdicts(self, states: list[KVPoll]) -> list[Verdict]:
        """One verdict per room from every rank's state of it (same rooms, same order)."""
        flags = [
            [s != KVPoll.Success for s in states],
            [s == KVPoll.Failed for s in states],
            [s == KVPoll.Bootstrapping for s in states],
        ]
        if self.size > 1 and states:  # any rank's flag counts
            flags = self._any(flags)
        return [_verdict(*room) for room in zip(*flags, strict=True)]

    def _any(self, flags: list[list[bool]]) -> list[list[int]]:
        """Each flag set where any rank's is: bitmasks OR-ed over the links, or one MAX
        all-reduce over the process group."""
        if self.links is None:
            reduced = torch.tensor(flags, dtype=torch.int32)
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=self.process_group)
            return reduced.tolist()
        masks = tuple(sum(1 << i for i, flag in enumerate(row) if flag) for row in flags)
        combined = self.links.all_or(masks)
        count = len(flags[0])
        return [[mask >> i & 1 for i in range(count)] for mask in combined]


def _verdict(pending: int, failed: int, bootstrapping: int) -> Verdict:
    if failed:
        return Verdict.FAILED
    if bootstrapping:
        return Verdict.BOOTSTRAPPING
    return Verdict.WAIT if pending else Verdict.SUCCESS
