"""A control socket's zmq descriptor tells only of what changed since the socket was last used:
a send can take a frame's notice in. The loop sleeping on those descriptors (its native sleep)
asks the sockets used since it last looked whether a frame waits (ControlChannel.waiting)."""

import zmq

from kvferry.transport.control import ControlChannel
from kvferry.transport.messages import Codec, ErrorReply, Heartbeat

CODEC = Codec(max_frame_bytes=4096)


def test_sockets_used_since_the_last_look_are_asked_whether_a_frame_waits():
    context = zmq.Context()
    a = ControlChannel(context, CODEC, "127.0.0.1")
    b = ControlChannel(context, CODEC, "127.0.0.1")
    try:
        assert a.waiting() == [] and b.waiting() == []  # nothing used yet
        assert a.send(b.address, Heartbeat([]))
        to_b = a._outbound[b.address]
        assert a.waiting() == []  # used, but nothing came back on it
        assert b.inbound.poll(10_000)  # the heartbeat is in, unread
        b.reply(a.address, ErrorReply("not now"))  # b's inbound used while a frame waits
        assert b.waiting() == [b.inbound]
        assert b.waiting() == []  # each use is asked about once
        assert [type(m) for _, m in b.receive([b.inbound])] == [Heartbeat]
        assert to_b.poll(10_000)  # the reply is in: a did not use the socket since it looked
        assert a.waiting() == []
        a.send(b.address, Heartbeat([]))  # now it did, with the reply still unread
        assert a.waiting() == [to_b]
        assert [type(m) for _, m in a.receive([to_b])] == [ErrorReply]
    finally:
        a.close()
        b.close()
