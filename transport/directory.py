"""Where a decode rank finds the prefill ranks behind a bootstrap address.

Lookups run on a small thread pool (a bootstrap server may be slow or absent; the transfer
thread never waits on it) and are retried until every prefill rank has registered or the
bootstrap timeout passes. Answers are cached per address until one of its ranks is lost, or
until the daemon says the group behind the address is another incarnation (`expect`: its probe
saw a restarted prefill daemon, whose ranks have new addresses, while this rank had no room
there to lose). An answer naming a rank lost while its lookup ran, or of an incarnation other
than the one expected, is handed to its waiters but not cached (the bootstrap server may have
answered before it heard of the loss, or before it was restarted).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec
import zmq

from kvferry.staging.layout import KVLayout
from kvferry.staging.plan import cached_plan
from kvferry.transport.config import TransferConfig
from kvferry.transport.control import request
from kvferry.transport.failure import Failure, FailureKind
from kvferry.transport.messages import (
    Codec,
    Peers,
    QueryPeers,
    RankInfo,
    check_control_address,
)
from kvferry.transport.tags import MAX_WRITERS

LOOKUP_RETRY_S = 0.05
# (waiters, ranks, failure)
Resolved = Callable[[list, list[RankInfo] | None, Failure | None], None]
_ENCODER = msgspec.msgpack.Encoder()


def incarnation(ranks: list[RankInfo]) -> str:
    """Names one incarnation of a prefill group: a digest of its ranks as the bootstrap server
    lists them (layouts, UCX worker addresses, control addresses). Every answer of one
    incarnation has the same digest; a restarted daemon's ranks have new UCX worker addresses
    (and control ports), so its digest is new, as it is when a rank registers again. The
    decode daemon's probe and its ranks compute it alike from the same `Peers` answers."""
    return hashlib.blake2b(_ENCODER.encode(ranks), digest_size=8).hexdigest()


class PrefillDirectory:
    def __init__(
        self,
        context: zmq.Context,
        config: TransferConfig,
        post: Callable[[Callable[[], None]], None],
    ) -> None:
        self._context, self._config, self._post = context, config, post
        # bootstrap address -> (incarnation, ranks); an entry's incarnation is the expected
        # one wherever the daemon said which it expects
        self._cache: dict[str, tuple[str, list[RankInfo]]] = {}
        self._expected: dict[str, str] = {}  # bootstrap address -> incarnation the daemon saw
        self._waiting: dict[str, list] = {}
        # bootstrap address -> control addresses forgotten while its lookup runs
        self._lost_during: dict[str, set[str]] = {}
        self._stale_lookups: set[str] = set()  # addresses forgotten whole while looked up
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvferry-lookup")

    def resolve(self, bootstrap: str, waiter, done: Resolved) -> None:
        """Call done([waiter, ...], ranks, error) on the transfer thread once resolved."""
        cached = self._cache.get(bootstrap)
        if cached is not None:
            done([waiter], cached[1], None)
            return
        waiting = self._waiting.setdefault(bootstrap, [])
        waiting.append(waiter)
        if len(waiting) == 1:
            self._lost_during[bootstrap] = set()
            future = self._pool.submit(self._lookup, bootstrap)
            future.add_done_callback(lambda f: self._post(lambda: self._finish(bootstrap, f, done)))

    def forget(self, control_address: str) -> None:
        """A prefill rank was lost: look its group up afresh next time."""
        for bootstrap, (_, ranks) in list(self._cache.items()):
            if any(info.control_address == control_address for info in ranks):
                del self._cache[bootstrap]
        for lost in self._lost_during.values():
            lost.add(control_address)

    def expect(self, bootstrap: str, seen: str | None) -> None:
        """The decode daemon's probe sees incarnation `seen` of the group behind `bootstrap`
        (None: that bootstrap server stopped answering): what this rank knows of any other
        incarnation is forgotten and never used again. Safe from any thread; it takes effect
        on the transfer thread before anything posted there after it (a room opened later)."""
        self._post(lambda: self._expect(bootstrap, seen))

    def _expect(self, bootstrap: str, seen: str | None) -> None:
        if seen is None:
            self._expected.pop(bootstrap, None)
        else:
            self._expected[bootstrap] = seen
        cached = self._cache.get(bootstrap)
        if cached is not None and cached[0] != seen:
            del self._cache[bootstrap]
        if bootstrap in self._waiting:  # its answer may come from the old incarnation
            self._stale_lookups.add(bootstrap)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _finish(self, bootstrap: str, future, done: Resolved) -> None:
        waiters = self._waiting.pop(bootstrap, [])
        lost = self._lost_during.pop(bootstrap, set())
        stale = bootstrap in self._stale_lookups
        self._stale_lookups.discard(bootstrap)
        try:
            ranks = future.result()
        except Exception as exc:  # a failed lookup fails exactly the rooms that needed it
            done(waiters, None, Failure(FailureKind.PEER_LOST, f"bootstrap failed: {exc}"))
            return
        seen, expected = incarnation(ranks), self._expected.get(bootstrap)
        # an answer of the expected incarnation is current however long its lookup took
        current = seen == expected if expected is not None else not stale
        if current and not any(info.control_address in lost for info in ranks):
            self._cache[bootstrap] = (seen, ranks)
        done(waiters, ranks, None)

    def _lookup(self, bootstrap: str) -> list[RankInfo]:
        """Runs on a lookup thread: ask until every prefill rank has registered, or time out."""
        codec = Codec(self._config.max_frame_bytes)
        deadline = time.monotonic() + self._config.bootstrap_timeout_s
        while True:
            left = max(deadline - time.monotonic(), 0.01)
            reply = request(self._context, codec, bootstrap, QueryPeers(), left)
            if isinstance(reply, Peers):
                return reply.ranks
            if time.monotonic() + LOOKUP_RETRY_S > deadline:
                raise TimeoutError(
                    f"bootstrap server {bootstrap}: {getattr(reply, 'reason', reply)}"
                )
            time.sleep(LOOKUP_RETRY_S)


def check_addresses(ranks: list[RankInfo]) -> Failure | None:
    """Why these prefill ranks cannot be reached (no ranks, or a malformed control address: a
    socket connecting to it would raise), or None. Decoding checks the addresses already; a
    bootstrap server's answer is checked again before anything connects to it."""
    if not ranks:
        return Failure(FailureKind.BAD_MESSAGE, "invalid: bootstrap server lists no prefill ranks")
    for info in ranks:
        try:
            check_control_address(info.control_address, "control_address")
        except ValueError as exc:
            return Failure(
                FailureKind.BAD_MESSAGE, f"invalid: prefill rank {info.layout.tp_rank}: {exc}"
            )
    return None


def check_ranks(layout: KVLayout, ranks: list[RankInfo]) -> Failure | None:
    """Why the decode rank with `layout` cannot take KV from these prefill ranks, or None."""
    error = check_addresses(ranks)
    if error:
        return error
    if [info.layout.tp_rank for info in ranks] != list(range(len(ranks))):
        return Failure(
            FailureKind.BAD_MESSAGE, "invalid: bootstrap server lists prefill ranks out of order"
        )
    if len(ranks) > MAX_WRITERS:
        return Failure(
            FailureKind.INCOMPATIBLE,
            f"unsupported: {len(ranks)} prefill ranks exceed {MAX_WRITERS} writers",
        )
    sizes = {info.layout.tp_size for info in ranks}
    if sizes != {len(ranks)}:
        return Failure(
            FailureKind.BAD_MESSAGE,
            f"invalid: bootstrap server lists {len(ranks)} ranks of groups of {sorted(sizes)}",
        )
    for info in ranks:
        mismatch = layout.mismatch(info.layout)
        if mismatch:
            return Failure(
                FailureKind.INCOMPATIBLE,
                f"incompatible: prefill rank {info.layout.tp_rank}: {mismatch}",
            )
    try:
        cached_plan(layout.num_kv_heads, len(ranks), layout.tp_size, layout.mla)
    except ValueError as exc:
        return Failure(FailureKind.INCOMPATIBLE, f"incompatible: {exc}")
    return None
