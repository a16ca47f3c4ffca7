"""A decode daemon's requests in flight (server/request.py): which prompts go to their prefill
before the ranks reserve their pages (only while no other request waits for its pages), and
the hand-off of each room's prompt exactly once, whichever comes first."""

import zmq

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.server.prompt_handoff import PromptHandoff
from kvferry.daemon.server.request import DecodeRequest, Requests
from kvferry.transport.messages import Codec


def request() -> DecodeRequest:
    return DecodeRequest(0, [1, 2, 3], SamplingParams(4), "tcp://prefill:1", events=None)


def test_a_prompt_goes_early_only_while_no_other_request_waits_for_its_pages():
    requests = Requests()
    first, second, third = request(), request(), request()
    assert requests.add(first) is True  # alone: its prompt goes with the reservation
    assert requests.add(second) is False  # behind one waiting for pages: after its own
    requests.reserved(first)
    assert requests.add(third) is False  # the second still waits
    requests.reserved(second)
    requests.reserved(third)
    assert requests.add(request()) is True
    moved = requests.move(first)  # to another prefill: it waits for pages again
    assert moved is False  # the request just added waits too


def test_an_ended_request_waits_for_nothing():
    requests = Requests()
    waiting = request()
    requests.add(waiting)
    assert requests.remove(waiting) is True and requests.remove(waiting) is False
    assert requests.move(waiting) is None  # it ended: nothing to move
    assert requests.add(request()) is True


def test_each_rooms_prompt_is_handed_over_once():
    handed = []
    context = zmq.Context()
    handoff = PromptHandoff(context, Codec(1 << 20), 5.0, failed=None)
    handoff._hand = lambda request, room, prefill: handed.append(room)  # no prefill here
    early, late = request(), request()
    early.room, late.room = 1, 2
    handoff.submit(early)  # before the reservation
    handoff.reserved(early, 1)  # the reservation: it went already
    handoff.reserved(late, 2)  # not early: it goes now
    late.room = 3  # moved to another room, reserved again there
    handoff.reserved(late, 3)
    handoff._pool.shutdown(wait=True)
    handoff.close()
    context.term()
    assert sorted(handed) == [1, 2, 3]
