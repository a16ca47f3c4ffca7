"""Daemons that hold a request in a chosen stage, for the fault matrix (test-only). A prompt whose
first token is one of the markers below stays in its stage for good: the fault under test, or the
request's own deadline, ends it. Everything else is served as usual.

The daemon runs from `serve()` (a `kvferry serve` with the holds patched in); its rank processes
are spawned with `held_rank` as their entry point, so the holds reach them too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REGISTERING = 250  # prefill holds the prompt: it never enters its scheduler, registered or not
WAITING_FOR_PROMPT = 251  # the prefill daemon accepts the prompt but never hands it to its ranks
COMPUTING = 252  # prefill holds the prompt's pages but never runs its forward
DECODING = 253  # decode holds the sequence after its first token until the gate file exists
# prefill computes the whole prompt and sends every chunk of its KV but the last, which never
# leaves: both sides' rooms stay Transferring, decode holding the chunks that arrived (the prompt
# must span two transfer chunks or more)
TRANSFERRING = 254
GATE = "KVFERRY_TEST_DECODE_GATE"  # the gate file's path, for the rank processes
# set (to anything): ranks do not watch their outbound control connections, as when a socket
# idle for PEER_IDLE_S was closed: a peer's restart is then noticed only by other means
UNWATCHED = "KVFERRY_TEST_UNWATCHED"


def _held(prompt, marker: int) -> bool:
    return len(prompt) > 0 and prompt[0] == marker


def held_rank(*args) -> None:
    """`worker_main`, with the rank-side holds (registering, computing, transferring)."""
    from kvferry.daemon.engine import prefill, scheduler
    from kvferry.daemon.server import worker

    _hold_last_chunks(prefill.PrefillEngine)
    admit = prefill.PrefillEngine._admit
    schedule = scheduler.PrefillScheduler.schedule
    decode_schedule = scheduler.DecodeScheduler.schedule
    gate = Path(os.environ[GATE])

    def held_admit(self, entry) -> None:
        if not _held(entry.seq.prompt, REGISTERING):
            admit(self, entry)

    def held_schedule(self):
        return [w for w in schedule(self) if not _held(w.seq.prompt, COMPUTING)]

    def held_decode_schedule(self):
        batch, kept = decode_schedule(self), []
        for work in batch:
            if _held(work.seq.prompt, DECODING) and not gate.exists():
                work.seq.in_flight -= 1  # not computed this step after all
            else:
                kept.append(work)
        return kept

    if os.environ.get(UNWATCHED):
        from kvferry.transport import control

        control.ControlChannel._monitor = lambda self, peer, socket: None
    prefill.PrefillEngine._admit = held_admit
    scheduler.DecodeScheduler.schedule = held_decode_schedule
    scheduler.PrefillScheduler.schedule = held_schedule
    worker.worker_main(*args)


def _hold_last_chunks(engine_class) -> None:
    """The transferring hold: a held prompt's room never hands its last chunk to the send
    pipeline, so that chunk is never sent and the room never completes (no TransferDone)."""
    from kvferry.transport import send_room

    submit, ready_chunks = engine_class.submit, send_room.SendRoom.ready_chunks
    held_rooms: set[int] = set()  # written by the engine thread, read by the transfer thread

    def held_submit(self, room, prompt, params):
        if _held(prompt, TRANSFERRING):
            held_rooms.add(room)
        return submit(self, room, prompt, params)

    def held_ready_chunks(self):
        for chunk, slots, ready in ready_chunks(self):
            if self.room in held_rooms and chunk == self.num_chunks - 1:
                return  # not yielded: the generator never counts it as queued
            yield chunk, slots, ready

    engine_class.submit = held_submit
    send_room.SendRoom.ready_chunks = held_ready_chunks


def serve(gate: str, unwatched: bool = False) -> None:
    """`kvferry serve` with the daemon-side hold (waiting for the prompt) and held ranks, the
    decoding hold released once the file `gate` exists; arguments as for `kvferry serve`.
    `unwatched`: the ranks do not watch their control connections (UNWATCHED)."""
    from kvferry.daemon.cli.main import main
    from kvferry.daemon.server import prompt_intake, ranks
    from kvferry.transport.messages import Ack

    submit = prompt_intake.PromptIntake.submit

    def held_submit(self, message, peer):
        if not _held(message.prompt, WAITING_FOR_PROMPT):
            return submit(self, message, peer)
        return Ack()  # taken, and never handed to the ranks

    prompt_intake.PromptIntake.submit = held_submit
    ranks.worker_main = held_rank
    os.environ[GATE] = gate
    if unwatched:
        os.environ[UNWATCHED] = "1"
    main(["serve", *sys.argv[1:]])


def serve_command(tests_dir: str, config_path: str, gate: str, unwatched: bool = False):
    """A Launcher command builder: each daemon of `config_path` served by `serve(gate,
    unwatched)`."""

    def build(daemon) -> list[str]:
        code = f"import sys; sys.path.insert(0, {tests_dir!r}); import support.held_stages as h"
        code += f"; h.serve({gate!r}, {unwatched!r})"
        return [sys.executable, "-c", code, "--config", str(config_path), "--name", daemon.name]

    return build
