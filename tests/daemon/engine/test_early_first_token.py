"""A decode engine alone on its rank (TP1) hands each room's first token over from the transfer
thread as the room succeeds, before the admission a step boundary later, which then reports no
token twice: the tokens of every request are those the admission alone reports."""

import threading

import pytest

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection
from support.engine_sim import engines, run_until_finished, submit_all

PROMPTS = [list(range(5, 24)), [1, 2, 3], list(range(40, 70))]


def _generate(max_tokens: int, report=None):
    """{room: (tokens, finish)} of PROMPTS through the engines, and what `report` (the decode
    engine's report_first, if given) was handed: (thread, output, room still arriving)."""
    config = ModelSection().model_config()
    server, prefill, decode = engines(None, model=(config, full_weights(config, None, seed=0)))
    handed = []

    def first(output):
        handed.append((threading.current_thread().name, output, output.room in decode.arriving))
        if report is not None:
            report(output)

    decode.report_first = first if report is not False else None
    try:
        rooms = submit_all(server, prefill, decode, PROMPTS, SamplingParams(max_tokens=max_tokens))
        outputs = run_until_finished(prefill, decode, len(rooms))
        errors = decode.agent.core.stats.internal_errors
    finally:
        decode.agent.close()
        prefill.agent.close()
        server.close()
    return outputs, handed, errors


@pytest.mark.parametrize("max_tokens", [6, 1])
def test_the_first_token_goes_out_as_the_room_succeeds(max_tokens):
    alone, handed, _ = _generate(max_tokens, report=False)
    assert not handed
    outputs, handed, errors = _generate(max_tokens, report=lambda output: None)
    assert errors == 0 and len(handed) == len(PROMPTS)
    for thread, output, arriving in handed:
        assert thread == "kvferry-decode-0" and arriving  # before the engine admitted it
        assert len(output.tokens) == 1 and output.finish is None
        assert {"kv_ready", "received_data"} <= output.marks.keys()
        tokens, finish = outputs[output.room]
        # the admission reports the rest, never the first token again; a request over at its
        # first token ends there with no token of its own
        assert (output.tokens + tokens, finish) == alone[output.room]
        assert tokens == [] if max_tokens == 1 else len(tokens) == max_tokens - 1


def test_a_first_token_that_could_not_be_handed_over_comes_with_the_admission():
    alone, _, _ = _generate(4, report=False)

    def broken(output):
        raise BrokenPipeError("the daemon went away")

    outputs, handed, errors = _generate(4, report=broken)
    assert len(handed) == len(PROMPTS) and errors == len(PROMPTS)  # logged and counted
    assert outputs == alone
