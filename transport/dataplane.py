"""Data plane: tagged bulk messages between ranks.

The base class validates; backends implement a few narrow hooks. `UcxDataPlane` (transport/ucx.py)
is the real one; `LoopbackDataPlane` (transport/loopback.py) moves bytes between planes of one
process, so unit tests of everything above run without UCX.

Receiving is probe-driven: the owner asks which message arrived (tag, length), validates both
against what it expects, finds room for it, and only then takes it. Messages it does not want
are discarded (taken into a scratch buffer, which also releases a waiting sender).

Nothing here blocks or spins: a backend offers a file descriptor (`wake_fd`) that turns
readable when something happened (a completion, an arrival); its owner sleeps on it, then calls
`progress()`, looks at its operations, and calls `arm()` before sleeping again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvferry.staging.buffer import Region
from kvferry.transport.failure import Failure, FailureKind

U64 = 1 << 64
MAX_ENDPOINTS = 256  # open endpoints per rank (a UCX endpoint holds sockets while open)


class InvalidAddress(ValueError):
    """A peer-supplied data-plane address that cannot be connected to (refused before the
    backend ever parses it)."""


class EndpointLimitError(RuntimeError):
    """No endpoint can be opened to a new peer: the rank holds too many already."""


def data_failure(reason: str, peer_gone: bool = False) -> Failure:
    """How a backend tells why a send or receive failed: the peer (process or link) is gone,
    or the operation itself failed."""
    if peer_gone:
        return Failure(FailureKind.PEER_LOST, f"peer lost: {reason}")
    return Failure(FailureKind.DATA_PLANE, reason)


def failure(operation: str, error: Failure) -> Failure:
    """What a room fails with when its `operation` ("send", "receive") failed with `error`:
    a peer that went away stays a peer loss, whatever was in flight."""
    if error.kind is FailureKind.PEER_LOST:
        detail = error.detail.removeprefix("peer lost: ")
        return Failure(error.kind, f"peer lost: {operation} failed: {detail}")
    return Failure(error.kind, f"{operation} failed: {error.detail}")


class DataOp:
    """A send or receive in flight."""

    finished_at: float | None = None  # when it completed (time.time()), where the plane says
    length: int | None = None  # bytes it received, where the plane says (else its buffer's)

    def done(self) -> bool:
        raise NotImplementedError

    def error(self) -> Failure | None:
        """Why it failed, once done (`data_failure`); None on success."""
        raise NotImplementedError

    @property
    def cancelled(self) -> bool:
        """Done because it was cancelled before its message came (`DataPlane.cancel`)."""
        return False


class DoneOp(DataOp):
    def __init__(self, error: str | None = None, peer_gone: bool = False) -> None:
        self._error = data_failure(error, peer_gone) if error is not None else None

    def done(self) -> bool:
        return True

    def error(self) -> Failure | None:
        return self._error


class DataPlane:
    """One rank's endpoint of the data plane. Used from the owning agent thread only."""

    def __init__(self) -> None:
        self._endpoints: dict[bytes, object] = {}
        self.max_endpoints = MAX_ENDPOINTS
        self.messages_sent = 0
        self.bytes_sent = 0
        self.messages_received = 0
        self.bytes_received = 0
        # operations were posted (or endpoints opened or closed) since the last progress():
        # the owner progresses after them even if the descriptor stayed silent
        self.posted = False
        # the last progress() completed no operation and left no new message to probe: what
        # woke it was UCX's own traffic (a fragment of a message still arriving). A backend
        # that cannot tell leaves it False
        self.quiet = False

    @property
    def address(self) -> bytes:
        raise NotImplementedError

    @property
    def wake_fd(self) -> int | None:
        """Readable when progress() has something to do, completions included; None: nothing
        to watch."""
        return None

    def on_loop_start(self) -> None:
        """Set up the thread that will drive this plane (called on it, before anything else)."""

    def progress(self) -> None:
        """Let the backend advance what is in flight (operations complete here); `quiet` says
        whether anything came of it."""
        self.posted = False
        self._progress()

    def arm(self) -> bool:
        """Before sleeping on `wake_fd`: False if events are pending already (progress again)."""
        return True

    def register_staging(self, address: int, length: int, device: bool) -> None:
        """The staging ring [address, +length), in device memory or not: a backend may
        register it once for the messages sent from it and received into it."""

    @property
    def sleeps(self) -> bool:
        """Whether the owner's thread can sleep in `sleep` rather than on `wake_fd`."""
        return False

    @property
    def sleep_events(self) -> int:
        """The plane's events `sleep` took without waking its owner."""
        return 0

    def sleep(self, fds: tuple[int, ...], timeout_s: float, messages: bool):
        """Sleep until the owner has something to do, at most `timeout_s`, taking the plane's
        own events meanwhile without the owner (where `sleeps`). Returns (why, the descriptors
        of `fds` readable, the thread CPU spent inside the backend); why: "data" (an operation
        completed, or `messages` and a new message waits to be probed), "fds" or "timer"."""
        raise NotImplementedError

    def endpoint(self, address: bytes, on_error: Callable[[str], None]):
        """The (cached) endpoint to the peer at `address`; `on_error` fires if it breaks.
        Raises InvalidAddress for an address this backend cannot use, EndpointLimitError for
        a new one past `max_endpoints`."""
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            if len(self._endpoints) >= self.max_endpoints:
                raise EndpointLimitError(
                    f"busy: this rank already holds {self.max_endpoints} data-plane endpoints"
                )
            endpoint = self._connect(address, on_error)
            self._endpoints[address] = endpoint
            self.posted = True
        return endpoint

    def drop_endpoint(self, address: bytes) -> None:
        """Forget the endpoint to `address`, which broke (the backend has closed it)."""
        self._endpoints.pop(address, None)

    def close_endpoint(self, address: bytes) -> None:
        """Close the endpoint to `address`. Only for one nothing is sent over any more: sends
        in flight on it would fail."""
        endpoint = self._endpoints.pop(address, None)
        if endpoint is not None:
            self._disconnect(endpoint)
            self.posted = True

    @property
    def open_endpoints(self) -> int:
        return len(self._endpoints)

    def send(
        self, endpoint, buffer: torch.Tensor | Region, tag: int, group: object = None
    ) -> DataOp:
        """Send `buffer` (a contiguous tensor or a staging Region) as one message, in `group`
        (from `open_group`) if given."""
        _check(buffer, tag)
        self.messages_sent += 1
        self.bytes_sent += buffer.numel() * buffer.element_size()
        self.posted = True
        return self._send(endpoint, buffer, tag, group)

    def send_note(self, endpoint, payload: torch.Tensor, tag: int, group: object = None) -> DataOp:
        """Send `payload` (bytes in a host tensor) as one message that is not KV: a writer's
        TransferDone (tags.DONE_PIECE). Not counted with the data messages."""
        _check(payload, tag)
        self.posted = True
        return self._send(endpoint, payload, tag, group)

    def probe(self) -> tuple[int, int] | None:
        """(tag, length) of the oldest message that arrived and was not taken yet."""
        return self._probe()

    @property
    def chains_copies(self) -> bool:
        """Whether `recv` can launch a copy the moment the bytes are in (its `then`)."""
        return False

    def recv(
        self, tag: int, buffer: torch.Tensor | Region, then: Callable[[object], None] | None = None
    ) -> DataOp:
        """Take the message with `tag` (seen by probe) into `buffer`. `then(launch)`, where the
        plane chains copies: called before the receive is posted, to write into `launch` the
        copy its completion launches (staged_mode.chain); a receive that cannot chain one
        (its backend ran out of native records) does not call it."""
        _check(buffer, tag)
        self.messages_received += 1
        self.bytes_received += buffer.numel() * buffer.element_size()
        self.posted = True
        return self._recv(tag, buffer, then)

    @property
    def posts_ahead(self) -> bool:
        """Whether `expect` can post a receive before its message arrives."""
        return False

    def expect(
        self,
        tag: int,
        buffer: torch.Tensor | Region,
        then: Callable[[object], None] | None = None,
        group: object = None,
    ) -> DataOp | None:
        """Post the receive of the message with `tag` into `buffer` before it arrives (`then`
        as for `recv`), in `group` (from `open_group`) if given: `probe` never sees it. A
        longer one fails the receive, nothing written past `buffer`; a shorter one launches no
        copy (the receive's `error` says so). None where nothing was posted (no
        `posts_ahead`, or no record free): it comes by `probe`."""
        if not self.posts_ahead:
            return None
        _check(buffer, tag)
        op = self._expect(tag, buffer, then, group)
        self.posted = self.posted or op is not None
        return op

    def open_group(self) -> object:
        """A group for a room's operations (its receives posted ahead; its sends): where the
        plane has groups, their completions but the last (or a failed one) wake no sleep, so
        that the owner takes them in one turn. None where it has none (every one wakes)."""
        return None

    def close_group(self, group: object) -> None:
        """The operations of `group` (from `open_group`, not None) are all posted."""

    def all_loud(self, on: bool) -> None:
        """While `on`, every completion wakes the owner, a group's too (its ring is full: each
        completion may give room back)."""

    def count_received(self, nbytes: int) -> None:
        """A receive posted by `expect` took its message in (counted then, not when posted)."""
        self.messages_received += 1
        self.bytes_received += nbytes

    def cancel(self, op: DataOp) -> None:
        """Cancel a receive posted by `expect`: it completes, cancelled, in a later progress,
        unless its message had begun to arrive (then it completes as it would have)."""

    def recv_note(self, tag: int, buffer: torch.Tensor) -> DataOp:
        """Take the message with `tag` (seen by probe), one `send_note` sent, into `buffer`."""
        _check(buffer, tag)
        self.posted = True
        return self._recv(tag, buffer, None)

    def discard(self, tag: int) -> DataOp:
        """Take the message with `tag` and throw it away (its sender is released)."""
        self.posted = True
        return self._discard(tag)

    def close(self) -> None:
        for address in list(self._endpoints):
            self.close_endpoint(address)

    # backend hooks
    def _progress(self) -> None:
        """What progress() does in this backend."""

    def _connect(self, address: bytes, on_error: Callable[[str], None]):
        raise NotImplementedError

    def _disconnect(self, endpoint) -> None:
        """Close an endpoint made by _connect (its error callback must not fire any more)."""

    def _send(self, endpoint, buffer: torch.Tensor, tag: int, group: object) -> DataOp:
        raise NotImplementedError

    def _probe(self) -> tuple[int, int] | None:
        raise NotImplementedError

    def _recv(self, tag: int, buffer: torch.Tensor, then) -> DataOp:
        raise NotImplementedError

    def _discard(self, tag: int) -> DataOp:
        raise NotImplementedError

    def _expect(self, tag: int, buffer: torch.Tensor, then, group) -> DataOp | None:
        """What expect() does where `posts_ahead`."""
        return None


def _check(buffer: torch.Tensor, tag: int) -> None:
    if not buffer.is_contiguous():
        raise ValueError("data-plane buffers must be contiguous")
    if not 0 <= tag < U64:
        raise ValueError(f"tag {tag} is not an unsigned 64-bit value")
