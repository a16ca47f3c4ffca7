"""Host-side links between the tensor-parallel ranks of one daemon: a duplex pipe between every
two ranks, made by the daemon before it spawns them (a daemon's ranks all run on its host).

A step's control exchange (the commands rank 0 took, every rank's view of its rooms) and the
barrier of the all-reduce for ranks that share a GPU go over these rather than a gloo group:
between two processes of one host a gloo collective waits hundreds of µs, a pipe round trip a
few (`python bench/host_costs.py`, "group exchange"). The model's own all-reduces stay on the
process group (NCCL, or gloo's for host tensors).

Every rank calls the same operations in the same order, as with any collective. Each message
carries its kind, so a rank that fell out of step fails with an error rather than misreading a
message; a peer that is gone (its end closed) or silent past `timeout_s` fails the same way.
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection

BARRIER, BROADCAST, REDUCE = b"B", b"C", b"R"
_KINDS = {BARRIER: "a barrier", BROADCAST: "a broadcast", REDUCE: "a reduction"}


class GroupError(RuntimeError):
    """A peer rank is gone, silent past the timeout, or out of step."""


def make_links(ctx, size: int) -> list[dict[int, Connection]]:
    """For `size` ranks, each rank's {peer rank: its end of their pipe} (`ctx`: a
    multiprocessing context). Hand rank r's map to rank r's process; the maker closes its
    copies once every rank has started (`close_links`)."""
    links: list[dict[int, Connection]] = [{} for _ in range(size)]
    for a in range(size):
        for b in range(a + 1, size):
            links[a][b], links[b][a] = ctx.Pipe(duplex=True)
    return links


def close_links(links: list[dict[int, Connection]]) -> None:
    for ends in links:
        for conn in ends.values():
            conn.close()


class Links:
    """This rank's ends of the pipes to every other rank of its group."""

    def __init__(self, rank: int, peers: dict[int, Connection], timeout_s: float) -> None:
        self.rank, self.peers, self.timeout_s = rank, dict(sorted(peers.items())), timeout_s

    def barrier(self) -> None:
        """Return once every rank has called it."""
        for peer in self.peers:
            self._send(peer, BARRIER, b"")
        for peer in self.peers:
            self._receive(peer, BARRIER)

    def broadcast(self, obj, root: int = 0):
        """`root`'s `obj` on every rank (picklable)."""
        if self.rank == root:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            for peer in self.peers:
                self._send(peer, BROADCAST, payload)
            return obj
        return pickle.loads(self._receive(root, BROADCAST))

    def all_or(self, values: tuple[int, ...]) -> tuple[int, ...]:
        """The bitwise OR over every rank of each of `values` (non-negative ints, the same
        count on every rank): one message to and from each peer."""
        payload = pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)
        for peer in self.peers:
            self._send(peer, REDUCE, payload)
        combined = list(values)
        for peer in self.peers:
            theirs = pickle.loads(self._receive(peer, REDUCE))
            if len(theirs) != len(combined):
                raise GroupError(
                    f"rank {self.rank}: rank {peer} reduced {len(theirs)} values, "
                    f"this rank {len(combined)}: the ranks are out of step"
                )
            combined = [mine | other for mine, other in zip(combined, theirs, strict=True)]
        return tuple(combined)

    def close(self) -> None:
        for conn in self.peers.values():
            conn.close()

    def _send(self, peer: int, kind: bytes, payload: bytes) -> None:
        try:
            self.peers[peer].send_bytes(kind + payload)
        except OSError as exc:  # BrokenPipeError, ConnectionResetError: its end is closed
            raise GroupError(f"rank {self.rank}: rank {peer} is gone ({exc})") from None

    def _receive(self, peer: int, kind: bytes) -> bytes:
        conn, what = self.peers[peer], _KINDS[kind]
        try:
            if not conn.poll(self.timeout_s):
                raise GroupError(
                    f"rank {self.rank}: no word from rank {peer} within {self.timeout_s:g}s "
                    f"(waiting for {what})"
                )
            message = conn.recv_bytes()
        except (EOFError, OSError):
            gone = f"rank {self.rank}: rank {peer} is gone (waiting for {what})"
            raise GroupError(gone) from None
        if message[:1] != kind:
            got = _KINDS.get(message[:1], repr(message[:1]))
            raise GroupError(
                f"rank {self.rank}: rank {peer} sent {got} where {what} was due: "
                "the ranks are out of step"
            )
        return message[1:]
