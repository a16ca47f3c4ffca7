"""The decoder against Hugging Face transformers on tiny random checkpoints it saves itself."""

import numpy as np
import pytest
import torch

from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.model.llama import Model, SeqBatch
from kvferry.daemon.model.weights import full_weights
from ports import free_port
from support.model_helpers import VARIANTS, checkpoint, greedy, hf_greedy

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(tmp_path, variant):
    hf, path = checkpoint(tmp_path, variant)
    config = ModelConfig.from_dir(path)
    model = Model(config, full_weights(config, path))
    prompt = [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 200, 31]
    with torch.no_grad():
        hf_logits = hf(torch.tensor([prompt])).logits[0, -1]
    expected = hf_greedy(hf, prompt, 12)
    kv = torch.zeros(2 * config.num_hidden_layers, 64, model.local_kv, config.head_dim)
    ours = model.forward(
        torch.tensor(prompt),
        torch.arange(len(prompt)),
        [SeqBatch(len(prompt), np.arange(len(prompt)))],
        kv,
    )
    torch.testing.assert_close(ours[0], hf_logits, atol=1e-4, rtol=1e-4)
    assert greedy(model, prompt, 12) == expected


def test_batched_sequences_match_one_at_a_time(tmp_path):
    _, path = checkpoint(tmp_path, "qwen3")
    config = ModelConfig.from_dir(path)
    model = Model(config, full_weights(config, path))
    a, b = [1, 2, 3, 4, 5, 6, 7], [9, 8, 7]
    kv = torch.zeros(2 * config.num_hidden_layers, 32, model.local_kv, config.head_dim)
    slots_a, slots_b = np.arange(0, 7), np.arange(16, 19)
    both = model.forward(
        torch.tensor(a + b),
        torch.tensor(list(range(7)) + list(range(3))),
        [SeqBatch(7, slots_a), SeqBatch(3, slots_b)],
        kv,
    )
    alone = model.forward(
        torch.tensor(b), torch.arange(3), [SeqBatch(3, slots_b)], torch.zeros_like(kv)
    )
    torch.testing.assert_close(both[1], alone[0])
    # a decode step of both (one token each, contexts of different lengths, padded together)
    step = model.forward(
        torch.tensor([11, 12]),
        torch.tensor([7, 3]),
        [SeqBatch(1, np.arange(0, 8)), SeqBatch(1, np.arange(16, 20))],
        kv,
    )
    one = model.forward(torch.tensor([12]), torch.tensor([3]), [SeqBatch(1, np.arange(16, 20))], kv)
    torch.testing.assert_close(step[1], one[0])


def test_random_init_is_seeded_and_config_errors_name_the_value(tmp_path):
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    assert torch.equal(full_weights(config, None, seed=3)["model.norm.weight"], torch.ones(32))
    assert torch.equal(
        full_weights(config, None, seed=3)["lm_head.weight"],
        full_weights(config, None, seed=3)["lm_head.weight"],
    )
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        ModelConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=3,
            head_dim=8,
        )
    with pytest.raises(ValueError, match="tp_size=3"):
        Model(config, full_weights(config, None), tp_size=3)
    with pytest.raises(ValueError, match=r"config\.json"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("tp", [2, 4])  # 4 ranks over 2 KV heads: each KV head on two ranks
def test_tensor_parallel_greedy_matches_transformers(tmp_path, tp):
    import multiprocessing as mp

    from support.tp_worker import greedy_rank

    hf, path = checkpoint(tmp_path, "qwen2")
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    expected = hf_greedy(hf, prompt, 8)
    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=greedy_rank, args=(r, tp, port, str(path), prompt, 8, out))
        for r in range(tp)
    ]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    assert [results[r] for r in range(tp)] == [expected] * tp
