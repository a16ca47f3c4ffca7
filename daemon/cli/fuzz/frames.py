"""Frames for the daemons' ZeroMQ sockets (the prefill bootstrap server, each rank's control
ROUTER), chosen by a seeded RNG: the same seed gives the same frames.

Families: random bytes; valid frames truncated, bit-flipped or with a wrong protocol version;
oversized (just over the limit and far over); multipart (small parts, and large ones); valid
messages with absurd values; targeted frames (inputs known to have hurt daemons before);
replays of earlier frames. Each frame also gets a sender identity (see zmq_sender.py).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from kvferry.daemon.cli.fuzz import values as v
from kvferry.transport.messages import U64_MAX

SOCKET_KINDS = ("bootstrap", "prefill-control", "decode-control")

# the messages each kind of socket is meant to take; the others are sent there too, less often
EXPECTED = {
    "bootstrap": ("RegisterRank", "QueryPeers", "SubmitPrompt"),
    "prefill-control": ("RegisterRoom", "Abort", "ErrorReply", "Heartbeat"),
    "decode-control": ("Heartbeat", "TransferDone", "Abort", "ErrorReply"),
}

FAMILIES = {  # name: weight
    "random": 10,
    "truncated": 10,
    "bitflip": 12,
    "version": 5,
    "oversized": 1,
    "multipart": 5,
    "multipart-large": 0.3,
    "absurd": 25,
    "targeted": 14,
    "replay": 8,
}

IDENTITIES = {  # name: weight (zmq_sender.py makes the sockets)
    "default": 30,  # ZeroMQ's own random identity: a peer that cannot be answered
    "foreign": 15,  # one fixed tcp:// identity pointing at a closed port
    "distinct": 40,  # a new tcp:// identity (closed port) for every frame
    "garbage": 15,  # random bytes
}


@dataclass(frozen=True)
class Frame:
    family: str  # for targeted frames: "targeted:<what>"
    parts: list[bytes]
    identity: str


class FrameMaker:
    """Frames for one socket of kind `kind` (one of SOCKET_KINDS)."""

    def __init__(self, kind: str, seed: int, learned: v.Learned, max_message_bytes: int) -> None:
        assert kind in SOCKET_KINDS, kind
        self.kind, self.learned = kind, learned
        self.rng = random.Random(seed)
        self.max_message_bytes = max_message_bytes
        self._sent: deque[list[bytes]] = deque(maxlen=256)
        self._families, self._family_weights = zip(*FAMILIES.items(), strict=True)
        self._identities, self._identity_weights = zip(*IDENTITIES.items(), strict=True)

    def next(self) -> Frame:
        rng = self.rng
        family = rng.choices(self._families, self._family_weights)[0]
        identity = rng.choices(self._identities, self._identity_weights)[0]
        if family == "targeted":
            what, parts, wanted = self._targeted()
            family, identity = f"targeted:{what}", wanted or identity
        elif family == "replay" and self._sent:
            parts = rng.choice(self._sent)
        else:
            family = "absurd" if family == "replay" else family  # nothing to replay yet
            parts = getattr(self, "_" + family.replace("-", "_"))()
        if family not in ("oversized", "multipart-large"):  # replaying those is costly
            self._sent.append(parts)
        return Frame(family, parts, identity)

    # --- families ---------------------------------------------------------------------------

    def _valid(self) -> bytes:
        kind, fields = self._message()
        return v.encode(kind, fields)

    def _message(self) -> tuple[str, dict]:
        rng, messages = self.rng, v.templates(self.rng, self.learned)
        names = EXPECTED[self.kind] if rng.random() < 0.8 else tuple(messages)
        kind = rng.choice(names)
        return kind, messages[kind]

    def _random(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.choice((0, 1, 2, 3, 8, 64, 1024, 8192)))]

    def _truncated(self) -> list[bytes]:
        frame = self._valid()
        return [frame[: self.rng.randrange(len(frame))]]

    def _bitflip(self) -> list[bytes]:
        frame = bytearray(self._valid())
        for _ in range(self.rng.randint(1, 8)):
            frame[self.rng.randrange(len(frame))] ^= 1 << self.rng.randrange(8)
        return [bytes(frame)]

    def _version(self) -> list[bytes]:
        version = self.rng.choice((0, 1, v.PROTOCOL_VERSION + 1, 0xFFFF, 0x8000))
        return [version.to_bytes(2, "big") + self._valid()[2:]]

    def _oversized(self) -> list[bytes]:
        limit = self.learned.max_frame_bytes
        size = limit + 1 if self.rng.random() < 0.7 else limit * self.rng.choice((4, 17))
        size = min(size, self.max_message_bytes)
        return [v.VERSION_BYTES + self.rng.randbytes(16) + b"\x00" * (size - 18)]

    def _multipart(self) -> list[bytes]:
        count = self.rng.randint(2, 40)
        return [
            self._valid() if self.rng.random() < 0.5 else self._random()[0] for _ in range(count)
        ]

    def _multipart_large(self) -> list[bytes]:
        """Many parts, each up to the limit or far over it (ZeroMQ's own cap is per part)."""
        part = self.learned.max_frame_bytes * self.rng.choice((1, 4, 15))
        count = max(2, min(self.rng.randint(2, 40), self.max_message_bytes // part))
        body = b"\x00" * (part - len(v.VERSION_BYTES))
        return [v.VERSION_BYTES + body] * count

    def _absurd(self) -> list[bytes]:
        kind, fields = self._message()
        return [v.encode(kind, v.mutate(self.rng, fields, self.rng.randint(1, 3)))]

    # --- targeted: inputs that are known to have hurt a daemon ------------------------------

    def _targeted(self) -> tuple[str, list[bytes], str | None]:
        makers = {
            "bootstrap": (_tiny_temperature, _big_seed, _forged_rank, _prompt_flood),
            "prefill-control": (_invalid_room, _garbage_ucx, _huge_tp, _unknown_abort),
            "decode-control": (_unknown_abort, _unknown_done, _unknown_accept),
        }[self.kind]
        what, kind, fields, identity = self.rng.choice(makers)(self.rng, self.learned)
        return what, [v.encode(kind, v.conform(self.rng, kind, fields))], identity


def _submit(rng: random.Random, learned: v.Learned, **fields) -> dict:
    return {
        "room": v.room(rng),
        "prompt": v.prompt(rng, learned),
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
    } | fields


def _tiny_temperature(rng, learned):
    t = rng.choice((1e-40, 1e-39, 1e-45, 5e-324, float("nan"), float("inf")))
    return "tiny-temperature", "SubmitPrompt", _submit(rng, learned, temperature=t), None


def _big_seed(rng, learned):
    seed = rng.choice((U64_MAX, 2**63, -1, -(2**63)))
    return "big-seed", "SubmitPrompt", _submit(rng, learned, temperature=0.7, seed=seed), None


def _prompt_flood(rng, learned):
    tokens = v.prompt(rng, learned, learned.max_prompt_tokens)
    return "prompt-flood", "SubmitPrompt", _submit(rng, learned, prompt=tokens), None


def _forged_rank(rng, learned):
    """A RegisterRank that is valid but for where it points (or points at a stranger)."""
    layout = learned.layout(rng)
    address = rng.choice((v.closed_address(), "not-an-endpoint", "tcp://[bad"))
    info = {"layout": layout, "ucx_address": learned.ucx_address(rng), "control_address": address}
    return "forged-register-rank", "RegisterRank", {"info": info}, None


def _room(rng, learned, **changes) -> dict:
    return v.templates(rng, learned)["RegisterRoom"] | changes


def _invalid_room(rng, learned):
    """Refused by validation, from a sender that cannot be answered (ZeroMQ's own identity)."""
    bad = rng.choice(
        ({"mode": "bogus"}, {"num_tokens": 0}, {"chunk_tokens": -1}, {"max_message_bytes": -1})
    )
    return "invalid-register-room", "RegisterRoom", _room(rng, learned, **bad), "default"


def _garbage_ucx(rng, learned):
    address = v._absurd_bytes(rng, learned.ucx_address(rng))
    return "garbage-ucx-address", "RegisterRoom", _room(rng, learned, ucx_address=address), None


def _huge_tp(rng, learned):
    tp = rng.choice((2**16, 2**20, 2**21))
    layout = v.decode_layout(rng, learned) | {"tp_size": tp, "tp_rank": rng.randrange(tp)}
    return "huge-tp-size", "RegisterRoom", _room(rng, learned, layout=layout), None


def _unknown_abort(rng, learned):
    return "unknown-room-abort", "Abort", {"room": v.room(rng), "reason": "fuzz"}, None


def _unknown_done(rng, learned):
    fields = {"room": v.room(rng), "src_rank": 0, "num_chunks": 1, "first_token": 1}
    return "unknown-room-done", "TransferDone", fields, None


def _unknown_accept(rng, learned):
    """A heartbeat that accepts rooms: unknown ones, or not the sender's to accept."""
    fields = {"accepted": [v.room(rng) for _ in range(rng.choice((1, 2, 64, 4096)))]}
    return "unknown-room-accept", "Heartbeat", fields, None
