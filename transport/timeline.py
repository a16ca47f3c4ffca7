"""Timestamps of one request's stages ("marks"), kept where each stage happens and joined by
room id: the prefill rank's travel to decode with TransferDone, the decode rank's with the
first token, and the daemon adds its own. Wall-clock seconds (time.time()), so that processes
of one host line up; across hosts they are as good as the hosts' clock sync.

Stage names, in a request's order: received, reserved, prompt_sent (decode daemon);
prefill_registered, prefill_scheduled (its first forward began to launch), prefill_first_forward,
prefill_last_forward, prefill_gathered, prefill_sent (the slowest prefill rank); registered,
first_data, received_data, scatter_queued, kv_ready (decode rank); admitted (decode engine);
first_token_out, done (decode daemon).
"""

from __future__ import annotations

import time

Marks = dict[str, float]
# what a prefill rank's TransferDone may carry: a peer's other keys are dropped
PREFILL_STAGES = frozenset(
    {
        "prefill_registered",
        "prefill_scheduled",
        "prefill_first_forward",
        "prefill_last_forward",
        "prefill_gathered",
        "prefill_sent",
    }
)


def first(marks: Marks, stage: str, at: float | None = None) -> None:
    """Note when `stage` was first reached (`at`: when it was, if not now; times noted out of
    order keep the earliest)."""
    at = time.time() if at is None else at
    if at < marks.get(stage, at + 1.0):
        marks[stage] = at


def last(marks: Marks, stage: str, at: float | None = None) -> None:
    """Note when `stage` was last reached (e.g. the last of a room's messages; times noted
    out of order keep the latest)."""
    at = time.time() if at is None else at
    if at > marks.get(stage, 0.0):
        marks[stage] = at


def merge_prefill(marks: Marks, prefill: Marks) -> None:
    """Take a prefill rank's marks (peer input: known stages only), keeping the later of two
    (several prefill ranks: the slowest counts)."""
    for stage in PREFILL_STAGES & prefill.keys():
        at = prefill[stage]
        if isinstance(at, float) and at > marks.get(stage, 0.0):
            marks[stage] = at
