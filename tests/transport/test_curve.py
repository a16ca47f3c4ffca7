"""CURVE on the bootstrap and control sockets: only holders of the deployment's key pair get a
frame through; anyone else is refused in the handshake, before anything is decoded."""

import contextlib

import pytest
import zmq

from kvferry.transport import curve
from kvferry.transport.bootstrap import BootstrapServer
from kvferry.transport.config import port_range
from kvferry.transport.control import ControlChannel, bind, request
from kvferry.transport.messages import Codec, ErrorReply, QueryPeers
from ports import free_ports

CODEC = Codec(max_frame_bytes=4096)


@pytest.fixture
def keys(tmp_path):
    return curve.load(curve.generate(tmp_path / "keys"))


@pytest.fixture
def member(keys):
    ctx = curve.context(keys)
    yield ctx
    curve.close(ctx)


def test_a_generated_key_file_loads_and_never_shows_its_secret(tmp_path, keys):
    path = tmp_path / "keys" / curve.KEY_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert keys.secret.decode() not in repr(keys) + str(keys)
    assert zmq.curve_public(keys.secret) == keys.public
    with pytest.raises(curve.KeyFileError, match="exists"):
        curve.generate(tmp_path / "keys")


def test_key_file_errors_name_the_file_and_never_the_secret(tmp_path, keys):
    with pytest.raises(curve.KeyFileError, match=r"missing\.key.*no such file"):
        curve.load(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("this is not a certificate\n")
    with pytest.raises(curve.KeyFileError, match=r"garbage\.key"):
        curve.load(garbage)
    public_only = tmp_path / "public.key"
    public_only.write_text(f'curve\n    public-key = "{keys.public.decode()}"\n')
    with pytest.raises(curve.KeyFileError, match=r"public\.key.*no secret key"):
        curve.load(public_only)
    mismatched = tmp_path / "mismatched.key"
    other_public, _ = zmq.curve_keypair()
    mismatched.write_text(
        f'curve\n    public-key = "{other_public.decode()}"\n'
        f'    secret-key = "{keys.secret.decode()}"\n'
    )
    with pytest.raises(curve.KeyFileError, match="not a CURVE key pair") as caught:
        curve.load(mismatched)
    assert keys.secret.decode() not in str(caught.value)


def test_a_keyless_client_never_reaches_the_bootstrap_handler(keys, member):
    submitted = []
    server = BootstrapServer(1, keys=keys, on_submit=lambda m, p: submitted.append(m))
    strangers = [_stranger(server.address, None), _stranger(server.address, keys.public)]
    try:
        for socket in strangers:
            for _ in range(5):
                _send_from(socket, b"garbage that would be a bad frame")
        # a member is answered; its own garbage is decoded (and counted), the strangers' never
        reply = request(member, CODEC, server.address, QueryPeers(), timeout_s=10)
        assert isinstance(reply, ErrorReply) and "0 of 1" in reply.reason
        garbage = request(member, CODEC, server.address, ErrorReply("x"), timeout_s=10)
        assert isinstance(garbage, ErrorReply) and "unexpected" in garbage.reason
        assert server.bad_frames == 1 and not submitted
        assert all(not socket.poll(100) for socket in strangers)  # never answered
    finally:
        for socket in strangers:
            socket.close(linger=0)
        server.close()


def test_a_keyless_client_never_reaches_a_control_channel(keys, member):
    channel = ControlChannel(member, CODEC, "127.0.0.1")
    strangers = [_stranger(channel.address, None), _stranger(channel.address, keys.public)]
    holder = member.socket(zmq.DEALER)
    try:
        for stranger in strangers:
            _send_from(stranger, b"from a stranger")
        holder.connect(channel.address)
        holder.send(b"from a member")
        assert channel.inbound.poll(10_000)
        (_sender, frame), *rest = channel.receive([channel.inbound])
        assert not rest and isinstance(frame, Exception)  # the member's, decoded and refused
        assert not channel.inbound.poll(200)  # nothing else came in
    finally:
        for socket in [*strangers, holder]:
            socket.close(linger=0)
        channel.close()


def test_control_sockets_bind_in_their_port_range():
    low = free_ports(1)[0]
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    sockets = [ctx.socket(zmq.ROUTER) for _ in range(2)]
    try:
        taken.bind(f"tcp://127.0.0.1:{low}")  # the first port is in use: the next one is taken
        assert bind(sockets[0], "127.0.0.1", (low, low + 1)) == low + 1
        with pytest.raises(zmq.ZMQError, match=f"no free port in {low}-{low + 1}"):
            bind(sockets[1], "127.0.0.1", (low, low + 1))
    finally:
        for socket in [taken, *sockets]:
            socket.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("spec", ["", "abc", "10-5", "0-10", "65000-70000", "1-2-3"])
def test_bad_port_ranges_are_refused(spec):
    with pytest.raises(ValueError):
        port_range(spec)


def test_port_ranges_parse():
    assert port_range("31000-31099") == (31000, 31099)
    assert port_range("31000") == (31000, 31000)
    assert port_range(None) is None


def _stranger(address: str, server_public: bytes | None) -> zmq.Socket:
    """A DEALER without the deployment's secret key: plain ZeroMQ (no `server_public`), or CURVE
    towards the server's public key with a key pair of its own."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    # A refused handshake drops the connection's pipe until the next reconnect: a send in
    # between has nowhere to go and would block the test for good.
    socket.setsockopt(zmq.SNDTIMEO, 1000)
    if server_public is not None:
        socket.curve_serverkey = server_public
        socket.curve_publickey, socket.curve_secretkey = zmq.curve_keypair()
    socket.connect(address)
    return socket


def _send_from(stranger: zmq.Socket, frame: bytes) -> None:
    """Send as a stranger; a send that finds no connection to queue on (its handshake was
    refused) times out, which is as good: nothing of it can reach the server."""
    with contextlib.suppress(zmq.Again):
        stranger.send(frame)


def test_a_members_part_at_the_frame_limit_is_read_whatever_curve_adds(keys, member):
    """CURVE makes each part longer on the wire; the receive limit allows for it, so a part of
    exactly max_frame_bytes reaches the codec (refused, answered) instead of the connection
    being dropped unread."""
    server = BootstrapServer(1, max_frame_bytes=4096, keys=keys)
    socket = member.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(server.address)
        socket.send(b"\xc1" * 4096)  # not msgpack: a bad frame, answered as one
        assert socket.poll(10_000), "the part was dropped with its connection, unread"
        assert isinstance(CODEC.decode(socket.recv()), ErrorReply)
        assert server.bad_frames == 1
    finally:
        socket.close()
        server.close()
