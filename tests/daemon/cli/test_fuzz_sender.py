"""The fuzzer's ZeroMQ sender never closes a socket that may be halfway through writing a
multipart message (libzmq 4.3.5 aborts the process if that connection then breaks): such a
socket stays open until the message has left, and the message arrives whole."""

import zmq

from kvferry.daemon.cli.fuzz import zmq_sender
from kvferry.daemon.cli.fuzz.frames import Frame
from kvferry.daemon.cli.fuzz.zmq_sender import RECENT_SOCKETS, ZmqFuzzer
from ports import free_ports


def test_socket_with_multipart_in_flight_stays_open_until_it_left(monkeypatch):
    monkeypatch.setattr(zmq_sender, "CLOSE_WAIT_S", 0.05)
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    context = zmq.Context()
    try:
        fuzzer = ZmqFuzzer(context, address, seed=0)
        parts = [b"first", b"x" * 100_000, b""]
        assert fuzzer.send(Frame("multipart", parts, "distinct"))  # nobody listens: it stays
        for _ in range(RECENT_SOCKETS):  # single-part frames on fresh sockets evict it
            assert fuzzer.send(Frame("random", [b"y"], "distinct"))
        assert fuzzer.waiting == 1  # due to be closed, kept open: its message has not left

        router = context.socket(zmq.ROUTER)
        router.bind(address)  # the kept socket reconnects and its message leaves
        received = []  # the 32 single-part frames of the other sockets come too, in any order
        while parts not in received and router.poll(10_000):
            received.append(router.recv_multipart()[1:])
        assert parts in received  # whole

        monkeypatch.setattr(zmq_sender, "CLOSE_WAIT_S", 10.0)
        assert fuzzer.close() == 0  # every socket closed now that the message has left
        assert fuzzer.waiting == 0
    finally:
        # whatever failed, nothing of this test may outlive it: a context collected later with
        # sockets still open would block the process in its destructor
        context.destroy(linger=0)


def test_stranger_frames_are_not_held():
    """A stranger's connections never pass the handshake, so they never begin a message."""
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    context = zmq.Context()
    try:
        fuzzer = ZmqFuzzer(context, address, seed=0, stranger_of=zmq.curve_keypair()[0])
        for _ in range(RECENT_SOCKETS + 4):
            assert fuzzer.send(Frame("multipart", [b"a", b"b"], "distinct"))
        assert fuzzer.waiting == 0
        assert fuzzer.close() == 0
    finally:
        context.destroy(linger=0)
