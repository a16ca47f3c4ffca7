"""Control messages for the fuzzer, as plain dicts: valid templates built from what the target
deployment told us, and the same with absurd values put in.

Dicts, not the wire Structs, because a Struct's constructor checks its values (a layout with
tp_size 0 cannot be built) and the point here is to send exactly what a hostile peer would.
The wire format is the one `Codec` decodes: the message's class name under "type".
"""

from __future__ import annotations

import copy
import random
import socket
from dataclasses import dataclass, field

import msgspec

from kvferry.transport import messages
from kvferry.transport.messages import PROTOCOL_VERSION, U64_MAX, RankInfo

VERSION_BYTES = PROTOCOL_VERSION.to_bytes(2, "big")

ABSURD_INTS = (0, -1, 1, 2**20, 2**21, 2**31, 2**63 - 1, 2**63, U64_MAX, -(2**63), 10**12)
ABSURD_FLOATS = (
    float("nan"),
    float("inf"),
    float("-inf"),
    1e-40,
    1e-39,
    5e-324,
    -1.0,
    0.0,
    1e308,
    -0.0,
)
BAD_ADDRESSES = (
    "",
    "not-an-endpoint",
    "tcp://[bad",
    "tcp://",
    "tcp://127.0.0.1:0",
    "tcp://127.0.0.1:99999",
    "tcp://999.1.1.1:80",
    "ipc:///tmp/kvferry-fuzz",
    "inproc://x",
    "tcp://*:1",
    "tcp://127.0.0.1:1\x00",
)


@dataclass
class Learned:
    """What the fuzzer knows of the deployment: the prefill group's rank infos (layouts, UCX
    and control addresses, from QueryPeers) and the limits the daemons enforce."""

    ranks: list[RankInfo] = field(default_factory=list)
    max_frame_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    vocab_size: int = 258

    def layout(self, rng: random.Random) -> dict:
        if not self.ranks:
            return {
                "model": "m",
                "num_layers": 4,
                "num_kv_heads": 4,
                "head_dim": 16,
                "dtype": "float32",
                "page_size": 16,
                "tp_size": 1,
                "tp_rank": 0,
                "mla": False,
            }
        return msgspec.to_builtins(rng.choice(self.ranks).layout)

    def ucx_address(self, rng: random.Random) -> bytes:
        return rng.choice(self.ranks).ucx_address if self.ranks else b"\x00" * 64


def closed_port() -> int:
    """A port nothing listens on right now: the kernel's pick for a socket closed at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_address() -> str:
    return f"tcp://127.0.0.1:{closed_port()}"


def room(rng: random.Random) -> int:
    return rng.getrandbits(64)


def prompt(rng: random.Random, learned: Learned, length: int | None = None) -> list[int]:
    length = length if length is not None else rng.randint(1, 16)
    return [rng.randrange(learned.vocab_size) for _ in range(length)]


def decode_layout(rng: random.Random, learned: Learned) -> dict:
    """A layout a decode rank of the same model could have: TP1, its own page size."""
    return learned.layout(rng) | {"tp_size": 1, "tp_rank": 0, "page_size": rng.choice((4, 8, 16))}


def templates(rng: random.Random, learned: Learned) -> dict[str, dict]:
    """One valid-looking instance of every message type (fields filled plausibly)."""
    info = {
        "layout": learned.layout(rng),
        "ucx_address": learned.ucx_address(rng),
        "control_address": closed_address(),
    }
    r = room(rng)
    made = {
        "RegisterRank": {"info": info, "token": rng.randbytes(16)},
        "QueryPeers": {},
        "Peers": {"ranks": [info]},
        "RegisterRoom": {
            "room": r,
            "layout": decode_layout(rng, learned),
            "ucx_address": learned.ucx_address(rng),
            "control_address": closed_address(),
            "recv_key": rng.randint(1, 1000),
            "num_tokens": rng.randint(1, 64),
            "chunk_tokens": 64,
            "mode": "staged",
            "layer_group": 0,
            "max_message_bytes": rng.choice((0, 1 << 20, 1 << 62)),
            "layer_taper": rng.choice((False, True)),
        },
        "TransferDone": {"room": r, "src_rank": 0, "num_chunks": 1, "first_token": 5},
        "Abort": {"room": r, "reason": "fuzz"},
        "SubmitPrompt": {
            "room": r,
            "prompt": prompt(rng, learned),
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": None,
        },
        "Heartbeat": {"accepted": [r]},
        "Ack": {},
        "ErrorReply": {"reason": "fuzz", "room": r},
    }
    return {kind: conform(rng, kind, fields) for kind, fields in made.items()}


def conform(rng: random.Random, kind: str, fields: dict) -> dict:
    """`fields` fitted to the message's current definition: unknown fields dropped, missing
    required ones filled, so valid templates stay valid as the wire format evolves."""
    known = msgspec.structs.fields(getattr(messages, kind))
    names = {f.name for f in known}
    fitted = {name: value for name, value in fields.items() if name in names}
    for f in known:
        required = f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
        if required and f.name not in fitted:
            fitted[f.name] = _FILLERS.get(f.type, lambda rng: None)(rng)
    return fitted


_FILLERS = {
    bytes: lambda rng: rng.randbytes(16),
    str: lambda rng: "x",
    int: lambda rng: 0,
    float: lambda rng: 0.0,
    bool: lambda rng: False,
}


def encode(kind: str, fields: dict) -> bytes:
    """A whole frame: protocol version, then the tagged msgpack message."""
    return VERSION_BYTES + msgspec.msgpack.encode({"type": kind, **fields})


def absurd_leaf(rng: random.Random, value):
    """A hostile value of the same shape as `value` (now and then of another shape)."""
    if rng.random() < 0.1:
        return rng.choice((None, "x", -1, [], {}, b"\xff", 1.5, True))
    if isinstance(value, bool):
        return not value
    if isinstance(value, int) or value is None:
        return rng.choice(ABSURD_INTS) if rng.random() < 0.8 else rng.getrandbits(64)
    if isinstance(value, float):
        return rng.choice(ABSURD_FLOATS)
    if isinstance(value, str):
        return rng.choice((*BAD_ADDRESSES, "x" * rng.choice((10_000, 200_000)), "\u202e\U0001f600"))
    if isinstance(value, bytes):
        return _absurd_bytes(rng, value)
    if isinstance(value, list):
        return rng.choice(([], [rng.choice(ABSURD_INTS)] * rng.randint(1, 100_000), [value]))
    return value


def _absurd_bytes(rng: random.Random, value: bytes) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return b""
    if choice == 1:
        return rng.randbytes(rng.randint(1, 256))
    if choice == 2 and value:
        return value[: rng.randrange(len(value))]
    if choice == 3 and value:
        flipped = bytearray(value)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    return b"\xff" * rng.choice((8, 4096, 200_000))


def mutate(rng: random.Random, fields: dict, count: int) -> dict:
    """`fields` with `count` leaves (at any depth) replaced by absurd values."""
    fields = copy.deepcopy(fields)
    for _ in range(count):
        paths = list(_leaf_paths(fields))
        if not paths:
            return fields
        *parents, key = rng.choice(paths)
        holder = fields
        for part in parents:
            holder = holder[part]
        holder[key] = absurd_leaf(rng, holder[key])
    return fields


def _leaf_paths(value, prefix=()):
    if isinstance(value, dict):
        for key, inner in value.items():
            if isinstance(inner, dict) and inner:
                yield from _leaf_paths(inner, (*prefix, key))
            else:
                yield (*prefix, key)
