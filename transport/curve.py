"""ZeroMQ CURVE for the bootstrap and control sockets: one key pair per deployment.

Every daemon and rank holding the deployment's key file is a member. A context made by
`context(keys)` makes every socket a CURVE client of a member (its default socket options) and
runs a ZAP handler admitting only the deployment's public key; `serve(socket)` turns a socket of
such a context into a CURVE server. A peer without the secret key fails the handshake, before
any frame of it reaches the application; ZeroMQ keeps nothing of it past the connection.

The secret key is never logged or shown: `CurveKeys` prints as its public key only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

KEY_FILE = "kvferry.key_secret"  # the name `generate` gives the key file
# What CURVE adds to a message part on the wire (its MESSAGE command's name, nonce, MAC and
# flags: 33 bytes), rounded up. ZeroMQ's ZMQ_MAXMSGSIZE applies to the part as it travels, so a
# receive limit of max_frame_bytes is raised by this much: a member's part of up to
# max_frame_bytes is read (and the codec's own limit applies), never its connection dropped.
WIRE_OVERHEAD = 64
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file, never the secret."""


@dataclass(frozen=True)
class CurveKeys:
    """The deployment's key pair (Z85, 40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)

    def __str__(self) -> str:
        return f"CurveKeys(public={self.public.decode()})"


def load(path: str | Path) -> CurveKeys:
    """The key pair in `path` (zmq's certificate format, with its secret key)."""
    if not Path(path).is_file():
        raise KeyFileError(f"curve_key_file={str(path)!r}: no such file")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, IndexError) as exc:
        raise KeyFileError(f"curve_key_file={str(path)!r}: {_why(exc)}") from None
    if secret is None:
        raise KeyFileError(f"curve_key_file={str(path)!r} holds no secret key (a public file?)")
    if len(public) != 40 or len(secret) != 40 or zmq.curve_public(secret) != public:
        raise KeyFileError(f"curve_key_file={str(path)!r}: not a CURVE key pair")
    return CurveKeys(public, secret)


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "not a ZeroMQ certificate file"  # never the parser's text: it may quote the file


def generate(directory: str | Path) -> Path:
    """Write a new key pair into `directory` (created, readable by its owner only); returns the
    key file's path. Refuses to overwrite one."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / KEY_FILE
    if path.exists():
        raise KeyFileError(f"{path} exists: remove it first to make a new key pair")
    public_file, secret_file = zmq.auth.create_certificates(str(folder), "kvferry")
    Path(public_file).unlink()  # members need the pair; a public file alone serves nobody
    Path(secret_file).chmod(0o600)
    Path(secret_file).rename(path)
    return path


def context(keys: CurveKeys | None) -> zmq.Context:
    """A context whose sockets speak CURVE with the deployment's members (plain without keys).
    Close it with `close`, which also stops its ZAP handler."""
    ctx = zmq.Context()
    if keys is None:
        return ctx
    ctx.setsockopt(zmq.CURVE_SERVERKEY, keys.public)  # every member serves with the same pair
    ctx.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    ctx.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", _Members(keys.public))
    _authenticators[ctx] = auth
    return ctx


def serve(socket: zmq.Socket) -> None:
    """Make `socket` a CURVE server if its context has keys (call before bind)."""
    if socket.getsockopt(zmq.MECHANISM) == zmq.CURVE:
        socket.setsockopt(zmq.CURVE_SERVER, 1)


def close(ctx: zmq.Context) -> None:
    """Stop the context's ZAP handler (if any), then terminate it."""
    auth = _authenticators.pop(ctx, None)
    if auth is not None:
        auth.stop()
    ctx.term()


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


class _Members:
    """ZAP credentials: only the deployment's public key is a member."""

    def __init__(self, public: bytes) -> None:
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._public


# the ZAP handler of each keyed context, stopped by `close` (one thread per context)
_authenticators: dict[zmq.Context, ThreadAuthenticator] = {}
