"""CUDA graphs of the decode step: the same tokens as the eager GPU path, whatever the batch
size (buckets and their spare rows) and wherever contexts cross page boundaries."""

import pytest
import torch

from kvferry.daemon.engine.block_manager import BlockManager
from kvferry.daemon.engine.runner import ModelRunner
from kvferry.daemon.engine.scheduler import Work
from kvferry.daemon.engine.sequence import SamplingParams, Sequence
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.weights import full_weights
from kvferry.daemon.server.config import ModelSection

pytestmark = pytest.mark.gpu

STEPS = 64
# (prompt length, first step, last step): batches of 1 to 6 sequences, joining and leaving
SCHEDULE = [(13, 0, 64), (3, 0, 20), (40, 5, 64), (7, 10, 50), (16, 12, 64), (1, 30, 64)]


def decode(graph_batch: int) -> tuple[dict[int, list[int]], ModelRunner]:
    config = ModelSection().model_config()
    model = Model(config, full_weights(config, None, seed=0), device="cuda")
    runner = ModelRunner(model, BlockManager(num_pages=96, page_size=4), graph_batch=graph_batch)
    seqs = {}
    for step in range(STEPS):
        for i, (length, first, _) in enumerate(SCHEDULE):
            if step == first:  # prefill, then it decodes
                seq = seqs[i] = Sequence([(7 * i + t) % 250 for t in range(length)], PARAMS)
                runner.blocks.allocate(seq.id, length)
                logits = runner.forward([Work(seq, 0, length)])
                seq.output.append(int(logits.argmax(-1)[0]))
        live = [seqs[i] for i, (_, first, last) in enumerate(SCHEDULE) if first <= step < last]
        batch = []
        for seq in live:
            runner.blocks.allocate(seq.id, seq.num_tokens)
            batch.append(Work(seq, seq.num_tokens - 1, 1))
        for seq, token in zip(live, runner.forward(batch).argmax(-1).tolist(), strict=True):
            seq.output.append(token)
    return {i: seq.output for i, seq in seqs.items()}, runner


PARAMS = SamplingParams(max_tokens=STEPS + 1)


def test_graph_replays_equal_the_eager_steps():
    eager, eager_runner = decode(graph_batch=0)
    graphed, runner = decode(graph_batch=4)  # batches of 5 and 6 run eagerly
    assert eager_runner.graphs is None
    assert runner.graphs is not None and runner.graphs.buckets == [1, 2, 4]
    assert runner.graphs.replays > 0
    assert graphed == eager
    torch.cuda.synchronize()
