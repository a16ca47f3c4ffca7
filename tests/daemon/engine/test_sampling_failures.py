"""A draw that fails (here: logits poisoned with NaN, as a faulty model would give) fails its own
request on the engines and releases what it held; the other requests carry on."""

import math

import pytest

from kvferry.daemon.engine.sequence import SamplingParams
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection
from kvferry.transport.failure import FailureKind
from support.engine_sim import engines, run_until_finished, submit_all

DOOMED, HEALTHY = [5, 6, 7, 8, 9], list(range(20, 31))


def _poison(runner, prompt: list[int]) -> None:
    """Test-only: the forward's logits for `prompt`'s rows become NaN."""
    forward = runner.forward

    def poisoned(batch, *args, **kwargs):
        logits = forward(batch, *args, **kwargs).clone()  # an inference tensor is read-only
        for row, work in enumerate(batch):
            if work.seq.prompt == prompt:
                logits[row] = math.nan
        return logits

    runner.forward = poisoned


# a GPU draws on the device (failures known once the step's tokens are read); a CPU on the host
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
COLD_START = dict(heartbeat_timeout_s=60.0, bootstrap_timeout_s=60.0, transfer_timeout_s=120.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_a_failed_draw_fails_only_its_request(side, device):
    config = ModelSection().model_config()
    model = (config, full_weights(config, None, seed=0))
    slow = COLD_START if device == "cuda" else {}
    server, prefill, decode = engines(None, device=device, model=model, **slow)
    _poison((prefill if side == "prefill" else decode).runner, DOOMED)
    params = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    try:
        doomed, healthy = submit_all(server, prefill, decode, [DOOMED, HEALTHY], params)
        outputs = run_until_finished(prefill, decode, 2)
        tokens, reason = outputs[doomed]
        assert "sampling failed: logits are not finite" in str(reason)
        # decode drew it: an internal failure; prefill drew it: decode hears prefill's abort
        told = FailureKind.INTERNAL if side == "decode" else FailureKind.PEER_ABORTED
        assert reason.kind is told
        assert len(tokens) == (0 if side == "prefill" else 1)  # decode: prefill's token only
        tokens, reason = outputs[healthy]
        assert reason in ("length", "stop") and tokens
        assert prefill.runner.blocks.used_pages == 0 and decode.runner.blocks.used_pages == 0
        assert not decode.busy
    finally:
        decode.agent.close()
        prefill.agent.close()
        server.close()
