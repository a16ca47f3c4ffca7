"""Control-plane wire messages: msgspec Structs, tagged, behind a protocol-version prefix.

A frame is 2 bytes of protocol version (big endian) followed by one msgpack-encoded message.
Decoding is strict: a wrong version, an unknown tag, a missing or mistyped field, or a frame
over the size limit raises WireError naming the problem; nothing is half-decoded. Addresses a
peer hands over are checked while decoding, so a malformed one never reaches a socket.

Protocol versions (a peer of another version is refused at its first frame):
1. The first wire format.
2. RegisterRoom carries `layer_group` (layer-wise messages).
3. RegisterRank carries the daemon's registration token (only the ranks it started may register);
   control addresses must be `tcp://<host>:<port>`.
4. Peers carries the prefill daemon's load (`PrefillLoad`): decode daemons pick the least loaded;
   ErrorReply says when a prompt was refused only for now (`busy`: sent again, it may be taken).
"""

from __future__ import annotations

import re
import struct

import msgspec

from kvferry.staging.layout import KVLayout

# 5: RegisterRoom.max_message_bytes (messages of several chunks); 6: a prefill rank's
# TransferDone travels on the data plane, behind its data (transport/tags.py, DONE_PIECE);
# 7: no RoomAccepted frame: a prefill rank's acceptances ride on its next Heartbeat
PROTOCOL_VERSION = 7
_VERSION = struct.Struct(">H")
U64_MAX = (1 << 64) - 1
MAX_ADDRESS_CHARS = 256
# a host name or IPv4 address, or an IPv6 address in brackets; then a port
TCP_ADDRESS = re.compile(r"tcp://([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


class WireError(ValueError):
    """A control frame that cannot be accepted."""


class FrameTooLarge(WireError):
    """A message of more bytes than `max_frame_bytes` (a refusal by that limit)."""


def multipart_error(parts: int, size: int, limit: int) -> WireError:
    """Why a message of `parts` parts and `size` bytes in all is refused."""
    if size > limit:
        return FrameTooLarge(
            f"message of {parts} parts, {size} bytes, exceeds max_frame_bytes={limit}"
        )
    return WireError(f"expected 1 frame, got {parts}")


class _Msg(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


def check_control_address(address: str, field: str) -> None:
    """ValueError naming `field` unless `address` is `tcp://<host>:<port>` with a port ZeroMQ
    can connect to (anything else would make the socket that connects to it raise)."""
    match = TCP_ADDRESS.fullmatch(address) if len(address) <= MAX_ADDRESS_CHARS else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{field}={address[:MAX_ADDRESS_CHARS]!r} is not tcp://<host>:<port>")


class RankInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to reach one prefill rank and what its cache holds."""

    layout: KVLayout
    ucx_address: bytes
    control_address: str

    def __post_init__(self) -> None:
        check_control_address(self.control_address, "control_address")


class RegisterRank(_Msg):
    """Prefill rank -> bootstrap server. `token` is the secret its daemon handed the ranks it
    started: a registration without it is refused, so nobody else can redirect the group."""

    info: RankInfo
    token: bytes


class QueryPeers(_Msg):
    """Decode rank -> bootstrap server: which prefill ranks are there?"""


class PrefillLoad(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a prefill daemon has taken and not finished, as its bootstrap server last saw it."""

    prompts: int = 0  # prompts taken, not done
    prompt_tokens: int = 0  # their tokens
    free_pages: int = 0  # KV pages free on its fullest rank


class Peers(_Msg):
    """Bootstrap server -> decode rank or daemon, once every prefill rank has registered."""

    ranks: list[RankInfo]
    load: PrefillLoad | None = None  # None: a server that does not report it


class RegisterRoom(_Msg):
    """Decode rank -> each prefill rank: expect room `room`, send my slices here."""

    room: int
    layout: KVLayout  # the decode rank's
    ucx_address: bytes
    control_address: str
    recv_key: int  # the decode rank's id for this room; data tags carry it
    num_tokens: int
    chunk_tokens: int
    mode: str
    layer_group: int = 0  # layers per message; 0: every layer of a chunk in one message
    # the largest data message this rank takes: chunks that are ready together may travel as
    # one message up to this size; 0: one chunk per message
    max_message_bytes: int = 0
    layer_taper: bool = False  # the last layer group split in halves (layout.layer_groups)

    def __post_init__(self) -> None:
        check_control_address(self.control_address, "control_address")


class TransferDone(_Msg):
    """Prefill rank -> decode rank: every chunk of the room has been sent to you (its sends
    posted). Sent as the rank's last data message of the room (tags.DONE_PIECE), encoded as a
    frame is; a decode rank refuses it as a control frame (the data plane's tag names the room's
    unguessable key, a control frame only its id)."""

    room: int
    src_rank: int
    num_chunks: int
    first_token: int | None = None
    marks: dict[str, float] = {}  # when this rank's stages of the room ended (timeline.py)


class Abort(_Msg):
    """Either side -> the other: the room failed here, fail it there too."""

    room: int
    reason: str


class SubmitPrompt(_Msg):
    """Decode daemon -> prefill bootstrap server: compute `prompt` for room `room` (whose
    decode ranks have reserved its pages and are registering it) and send its KV there."""

    room: int
    prompt: list[int]
    temperature: float = 0.0  # sampling of the first token
    top_p: float = 1.0
    seed: int | None = None


class Heartbeat(_Msg):
    """Sent every heartbeat interval to each peer sharing a room. A prefill rank's also
    names the rooms it has accepted the sender's registration of since its last one: a decode
    rank needs to know that only before its bootstrap deadline, so it costs no frame of its
    own (and no decode turn) per room."""

    accepted: list[int] = []


class Ack(_Msg):
    pass


class ErrorReply(_Msg):
    """A request could not be served; `room` when the error concerns one. `busy`: not now, for
    want of room — the same request may be sent again shortly."""

    reason: str
    room: int | None = None
    busy: bool = False


Message = (
    RegisterRank
    | QueryPeers
    | Peers
    | RegisterRoom
    | TransferDone
    | Abort
    | SubmitPrompt
    | Heartbeat
    | Ack
    | ErrorReply
)


class Codec:
    """Encodes and strictly decodes control frames."""

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Message)

    def encode(self, message: Message) -> bytes:
        return _VERSION.pack(PROTOCOL_VERSION) + self._encoder.encode(message)

    def decode(self, frame: bytes) -> Message:
        if len(frame) > self.max_frame_bytes:
            raise FrameTooLarge(
                f"frame of {len(frame)} bytes exceeds the limit of {self.max_frame_bytes} "
                "(max_frame_bytes)"
            )
        if len(frame) < _VERSION.size:
            raise WireError(f"frame of {len(frame)} bytes is too short for a protocol version")
        (version,) = _VERSION.unpack_from(frame)
        if version != PROTOCOL_VERSION:
            raise WireError(f"protocol version {version} is not this side's {PROTOCOL_VERSION}")
        try:
            message = self._decoder.decode(memoryview(frame)[_VERSION.size :])
        except (msgspec.DecodeError, ValueError) as exc:
            raise WireError(f"malformed frame: {exc}") from None
        _check_ids(message)
        return message


def _check_ids(message: Message) -> None:
    room = getattr(message, "room", None)
    if room is not None and not 0 <= room <= U64_MAX:
        raise WireError(f"room id {room} is not an unsigned 64-bit integer")
    for room in getattr(message, "accepted", ()):
        if not 0 <= room <= U64_MAX:
            raise WireError(f"accepted room id {room} is not an unsigned 64-bit integer")
