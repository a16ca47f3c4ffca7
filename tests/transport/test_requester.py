"""requester.Requester: request/reply exchanges over kept connections, against a real ROUTER
server on a socket: one connection serves one exchange after another; a request that timed out
takes its connection with it, so its late reply cannot answer the next; closed, it refuses."""

import threading
import time

import pytest
import zmq

from kvferry.transport.messages import Ack, Codec, ErrorReply, SubmitPrompt
from kvferry.transport.requester import Requester, RequesterClosed


@pytest.fixture
def server():
    """A ROUTER that answers each SubmitPrompt with ErrorReply(reason=<its room>) after
    `delays[room]` seconds (default none), and records who asked."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    codec, senders, delays, stop = Codec(), [], {}, threading.Event()

    def serve():
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        pending = []  # (due, identity, reply)
        while not stop.is_set():
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                router.send_multipart([item[1], codec.encode(item[2])])
            if not dict(poller.poll(5)):
                continue
            identity, frame = router.recv_multipart()
            message = codec.decode(frame)
            senders.append(identity)
            reply = ErrorReply(str(message.room)) if message.room else Ack()
            pending.append((now + delays.get(message.room, 0.0), identity, reply))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield context, f"tcp://127.0.0.1:{port}", senders, delays
    stop.set()
    thread.join(5)
    router.close(linger=0)
    context.term()


def test_one_connection_serves_one_exchange_after_another(server):
    context, address, senders, _ = server
    requests = Requester(context, Codec())
    try:
        replies = [requests.request(address, SubmitPrompt(room, [1]), 5.0) for room in (1, 2, 3)]
    finally:
        requests.close()
    assert [r.reason for r in replies] == ["1", "2", "3"]
    assert len(set(senders)) == 1  # the same connection each time


def test_a_late_reply_does_not_answer_the_next_request(server):
    context, address, senders, delays = server
    delays[7] = 0.5  # answered after the request gave up
    requests = Requester(context, Codec())
    try:
        with pytest.raises(TimeoutError):
            requests.request(address, SubmitPrompt(7, [1]), 0.1)
        reply = requests.request(address, SubmitPrompt(8, [1]), 5.0)
        threading.Event().wait(0.6)  # the late reply has come and gone
        again = requests.request(address, SubmitPrompt(9, [1]), 5.0)
    finally:
        requests.close()
    assert (reply.reason, again.reason) == ("8", "9")
    assert len(set(senders)) == 2  # the timed-out connection was not used again


def test_a_closed_requester_refuses(server):
    context, address, _, _ = server
    requests = Requester(context, Codec())
    requests.request(address, SubmitPrompt(1, [1]), 5.0)  # one idle connection, closed below
    requests.close()
    with pytest.raises(RequesterClosed):
        requests.request(address, SubmitPrompt(2, [1]), 5.0)
