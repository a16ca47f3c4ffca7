"""`kvferry fuzz`: hostile frames at every listening socket of a running deployment, then a
check that it still serves.

1. Find the sockets and processes (targets.py) and take a greedy completion.
2. Measure every daemon and rank process (RSS, fds, threads) and the bad-frame counters.
3. Send `frames` fuzz frames to each socket in turn (frames.py / http_requests.py), checking
   every CHECK_EVERY frames that every process is alive, so a death is pinned to a socket and
   the frame families just sent. With CURVE keys, every ZeroMQ socket first as a stranger
   without them (no daemon may count a frame of it), then as a member holding them.
4. Check /health, take the same completion again (it must be equal), measure again, and name
   every process that died or grew past the bounds.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable

import msgspec

from kvferry.daemon.cli.client import ClientError, DaemonClient
from kvferry.daemon.cli.fuzz.senders import LEFT_OPEN, http_sender, zmq_sender
from kvferry.daemon.cli.fuzz.targets import (
    BAD_FRAMES,
    INTERNAL_ERRORS,
    FuzzedSocket,
    ProcessFigures,
    Targets,
    discover,
    measure,
    summed,
)
from kvferry.daemon.cli.fuzz.zmq_sender import CLOSE_WAIT_S
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.api_key import read_api_key
from kvferry.daemon.server.config import Deployment

REPORT_LAG_S = 1.0  # twice the interval of the ranks' reports (daemon/server/worker.py)
CHECK_EVERY = 100  # frames between liveness checks of every process
SOCKET_KINDS = ("bootstrap", "prefill-control", "decode-control", "http")


class FuzzError(RuntimeError):
    """The fuzz could not start (no decode daemon, no completion before fuzzing)."""


class FuzzSpec(msgspec.Struct, frozen=True, kw_only=True):
    frames: int = 2000  # per socket
    seed: int = 0
    kinds: tuple[str, ...] = SOCKET_KINDS
    http_timeout_s: float = 0.25  # each fuzz HTTP connection
    max_message_bytes: int = 64 << 20  # the largest single ZeroMQ message sent
    prompt: tuple[int, ...] = (5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200)
    max_tokens: int = 8
    completion_timeout_s: float = 120.0
    max_fd_growth: int = 64
    max_thread_growth: int = 16
    max_rss_growth_bytes: int = 200 << 20


class SocketRun(msgspec.Struct, kw_only=True):
    name: str
    kind: str
    address: str
    mode: str = ""  # with CURVE keys: "stranger" (without them) or "member"
    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0
    families: dict[str, int] = {}
    outcomes: dict[str, int] = {}  # replies by type, HTTP statuses, refused sends

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


class ProcessRun(msgspec.Struct, kw_only=True):
    name: str
    pid: int
    before: ProcessFigures
    after: ProcessFigures | None = None


class FuzzResult(msgspec.Struct, kw_only=True):
    spec: FuzzSpec
    sockets: list[SocketRun] = []
    processes: list[ProcessRun] = []
    health: dict[str, str] = {}  # daemon -> /health status after the fuzz
    bad_frames: dict[str, list[int]] = {}  # daemon -> [before, after]
    internal_errors: dict[str, list[int]] = {}  # daemon -> [before, after]: each one a bug
    completion_before: list[int] = []
    completion_after: list[int] | None = None
    problems: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


def run_fuzz(
    deployment: Deployment, spec: FuzzSpec, log: Callable[[str], None] = lambda line: None
) -> FuzzResult:
    """Fuzz the running `deployment`; the figures and the problems found (empty when it
    survived). FuzzError when there is nothing to check against."""
    targets = discover(deployment)
    decode = next((d for d in deployment.daemons if d.role == "decode"), None)
    if decode is None:
        raise FuzzError("the deployment lists no decode daemon to take completions from")
    try:
        key = read_api_key(decode.api_key_file, decode.api_key_env)  # what its /v1/* asks
    except ValueError as exc:
        raise FuzzError(f"API key: {exc}") from None
    complete = functools.partial(_complete, targets.urls[decode.name or decode.role], spec, key)
    result = FuzzResult(spec=spec)
    try:
        result.completion_before = complete()
    except ClientError as exc:
        raise FuzzError(f"no completion before fuzzing: {exc}") from None
    result.processes = [
        ProcessRun(name=p.name, pid=p.pid, before=measure(p.pid)) for p in targets.processes
    ]
    before = {name: _counted(url) for name, url in targets.urls.items()}
    chosen = [(i, t) for i, t in enumerate(targets.sockets) if t.kind in spec.kinds]
    if targets.keys is not None:  # strangers first: nothing counted yet, nothing to lag behind
        strangers = [(i, t) for i, t in chosen if t.kind != "http"]
        for index, target in strangers:
            _fuzz(target, targets, spec, index, result, log, "stranger")
        _check_unread(result, targets, before, [t.name for _, t in strangers])
    for index, target in chosen:
        mode = "member" if targets.keys is not None and target.kind != "http" else ""
        _fuzz(target, targets, spec, index, result, log, mode)
    _check_after(result, targets, complete, before)
    return result


def _fuzz(target: FuzzedSocket, targets: Targets, spec: FuzzSpec, index, result, log, mode):
    """With CURVE keys, a ZeroMQ socket is fuzzed by a "stranger" without the secret key and
    by a "member" holding it; without keys, once ("")."""
    log(f"fuzzing {target.name}{mode and f' as a {mode}'} ({target.address})")
    seed = spec.seed * 1009 + index
    run = _fuzz_socket(target, targets, spec, seed, result, mode)
    result.sockets.append(run)
    if run.outcomes.get(LEFT_OPEN):
        result.problems.append(
            f"{run.name}: {run.outcomes[LEFT_OPEN]} fuzzer sockets left open: a multipart "
            f"message of theirs did not leave within {CLOSE_WAIT_S:.0f} s (not read?)"
        )


def _check_unread(result: FuzzResult, targets: Targets, before: dict, fuzzed: list) -> None:
    """A stranger's frames must be refused in the handshake: no daemon counts one. Ranks
    report their counters every half second, so they are read after a second's wait."""
    threading.Event().wait(REPORT_LAG_S)
    for name, url in targets.urls.items():
        after = _counted(url)[0]
        if after != before[name][0]:
            result.problems.append(
                f"{name}: bad frames counted {before[name][0]} -> {after} while a stranger "
                f"without keys fuzzed {', '.join(fuzzed)}: its frames were read"
            )


def _fuzz_socket(
    target: FuzzedSocket, targets: Targets, spec: FuzzSpec, seed: int, result, mode: str = ""
) -> SocketRun:
    name = f"{target.name} ({mode})" if mode else target.name
    run = SocketRun(name=name, kind=target.kind, address=target.address, mode=mode)
    families, outcomes, recent = Counter(), Counter(), Counter()
    if target.kind == "http":
        opened = http_sender(target, targets, seed, spec.http_timeout_s)
    else:
        opened = zmq_sender(target, targets, seed, mode, spec.max_message_bytes)
    start = time.monotonic()
    with opened as send:
        for n in range(1, spec.frames + 1):
            family, size, outcome = send()
            families[family] += 1
            recent[family] += 1
            run.bytes += size
            if outcome is not None:
                outcomes[outcome] += 1
            if n % CHECK_EVERY == 0 or n == spec.frames:
                _note_deaths(result, target, n, recent)
                recent.clear()
        outcomes.update(send.closing_outcomes())
    run.seconds = time.monotonic() - start
    run.frames, run.families, run.outcomes = sum(families.values()), dict(families), dict(outcomes)
    return run


def _note_deaths(result: FuzzResult, target: FuzzedSocket, n: int, recent: Counter) -> None:
    """Name each process found dead for the first time, with what was just sent."""
    for process in result.processes:
        if process.after is None and not measure(process.pid).alive:
            process.after = ProcessFigures(alive=False)
            sent = ", ".join(f"{family} x{count}" for family, count in recent.most_common())
            result.problems.append(
                f"{process.name} (pid {process.pid}) died while {target.name} was fuzzed, by "
                f"frame {n}; frames since the last check: {sent}"
            )


def _check_after(result: FuzzResult, targets: Targets, complete: Callable, before: dict) -> None:
    spec = result.spec
    for name, url in targets.urls.items():
        result.health[name] = _health(url)
        if result.health[name] != "ok":
            result.problems.append(f"{name}: /health says {result.health[name]} after the fuzz")
    try:
        result.completion_after = complete()
        if result.completion_after != result.completion_before:
            result.problems.append(
                f"the completion changed: {result.completion_before} before the fuzz, "
                f"{result.completion_after} after"
            )
    except ClientError as exc:
        result.problems.append(f"no completion after the fuzz: {exc}")
    for process in result.processes:
        _check_process(result, process, spec)
    threading.Event().wait(REPORT_LAG_S)  # the ranks' last counts
    for name, url in targets.urls.items():
        (bad, internal), after = before[name], _counted(url)
        result.bad_frames[name] = [bad, after[0]]
        result.internal_errors[name] = [internal, after[1]]
        if after[1] > internal:
            result.problems.append(
                f"{name}: {after[1] - internal} requests or frames whose handling raised "
                f"(*internal_errors_total, *failed_frames_total: each one a bug; its log says "
                f"which)"
            )


def _check_process(result: FuzzResult, process: ProcessRun, spec: FuzzSpec) -> None:
    if process.after is not None:  # already reported dead
        return
    after = process.after = measure(process.pid)
    first = process.before
    if not after.alive:
        result.problems.append(f"{process.name} (pid {process.pid}) died during the fuzz")
        return
    growth = (
        ("fds", after.fds - first.fds, spec.max_fd_growth),
        ("threads", after.threads - first.threads, spec.max_thread_growth),
        ("RSS bytes", after.rss_bytes - first.rss_bytes, spec.max_rss_growth_bytes),
    )
    for what, grew, bound in growth:
        if grew > bound:
            result.problems.append(f"{process.name}: {what} grew by {grew} (bound {bound})")


def _complete(url: str, spec: FuzzSpec, key: str | None) -> list[int]:
    request = CompletionRequest(prompt=list(spec.prompt), max_tokens=spec.max_tokens)
    with DaemonClient(url, spec.completion_timeout_s, key) as client:
        return client.complete(request).token_ids


def _health(url: str) -> str:
    try:
        with DaemonClient(url, 10.0) as client:
            return str(client.health().get("status", "?"))
    except ClientError as exc:
        return exc.reason


def _counted(url: str) -> tuple[int, int]:
    """The daemon's bad frames and internal errors, its ranks' included ((-1, -1): no answer)."""
    try:
        with DaemonClient(url, 10.0) as client:
            text = client.metrics()
    except ClientError:
        return -1, -1
    return summed(text, BAD_FRAMES), summed(text, INTERNAL_ERRORS)
