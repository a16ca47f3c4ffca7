"""CUDA graphs of the prefill forward: the same logits and KV as the eager GPU forward for
batches of one to several sequences and chunks (buckets padded with spare tokens and
sequences), the layer-group hook called at the groups' bounds, and batches past the graphs'
sizes run eagerly."""

import pytest
import torch

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.prefill_graphs import MAX_SEQS, layer_bounds
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import PrefillScheduler
from kvferry.daemon.engine.sequence import SamplingParams, Sequence
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection

pytestmark = pytest.mark.gpu

PAGE, PAGES, CHUNK, BATCH = 4, 600, 96, 256
# prompt lengths: chunked (200 = 96 + 96 + 8), several per forward, and a burst of short ones
# that puts more sequences in one forward than a graph holds
PROMPTS = [200, 13, 64, 1, 130] + [3] * (MAX_SEQS + 4)


def prefill(graphs: bool):
    """Every forward's logits and hook calls, and the runner, for PROMPTS prefilled in order."""
    config = ModelSection().model_config()
    model = Model(config, full_weights(config, None, seed=0), device="cuda")
    sizes = {"graph_tokens": BATCH, "layer_group": 1} if graphs else {}
    runner = ModelRunner(model, BlockManager(PAGES, PAGE), **sizes)
    scheduler = PrefillScheduler(runner.blocks, CHUNK, BATCH)
    seqs = []
    for i, length in enumerate(PROMPTS):
        seqs.append(Sequence([(11 * i + 3 * t) % 250 for t in range(length)], PARAMS))
        scheduler.add(seqs[-1])
    forwards = []
    while batch := scheduler.schedule():
        hooks = []
        logits = runner.forward(batch, after_layer=hooks.append)
        forwards.append(([len(batch), sum(w.count for w in batch)], logits.clone(), hooks))
        scheduler.computed(batch)
    torch.cuda.synchronize()
    return forwards, runner, seqs


PARAMS = SamplingParams(max_tokens=1)


def test_captured_forwards_equal_the_eager_ones():
    eager, eager_runner, seqs = prefill(graphs=False)
    graphed, runner, graphed_seqs = prefill(graphs=True)
    assert eager_runner.prefill_graphs is None
    captured = runner.prefill_graphs
    assert captured is not None and captured.buckets == [64, 128, BATCH]
    assert len(captured._graphs) == 3 * 3  # 1, 4 and 16 sequences
    layers = runner.model.config.num_hidden_layers
    assert captured.bounds == layer_bounds(layers, 1) == tuple(range(layers + 1))
    assert [shape for shape, _, _ in graphed] == [shape for shape, _, _ in eager]
    too_many = [i for i, (shape, _, _) in enumerate(eager) if shape[0] > MAX_SEQS]
    assert too_many  # the burst of short prompts ran eagerly
    assert captured.replays == len(eager) - len(too_many)
    for (shape, want, want_hooks), (_, got, hooks) in zip(eager, graphed, strict=True):
        assert hooks == want_hooks == list(range(1, layers + 1)), shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"forward {shape}")
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    for seq, other in zip(seqs, graphed_seqs, strict=True):  # the KV every prompt left
        slots = eager_runner.blocks.slots(seq.id, 0, seq.num_prompt)
        graphed_slots = runner.blocks.slots(other.id, 0, other.num_prompt)
        torch.testing.assert_close(
            runner.kv[:, graphed_slots], eager_runner.kv[:, slots], rtol=1e-4, atol=1e-4
        )


def test_the_spare_tokens_write_only_the_scratch_page():
    _, runner, seqs = prefill(graphs=True)
    used = torch.zeros(runner.kv.shape[1], dtype=torch.bool)
    for seq in seqs:
        used[torch.as_tensor(runner.blocks.slots(seq.id, 0, seq.num_prompt))] = True
    scratch = runner.blocks.num_pages * PAGE
    used[scratch : scratch + PAGE] = True
    assert not runner.kv[:, ~used.cuda()].any()  # the cache starts zeroed
