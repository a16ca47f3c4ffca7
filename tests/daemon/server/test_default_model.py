"""The embedded default of deploy/local.yaml: SmolLM2-135M-Instruct from the GGUF inside its
wheel, prefill TP3 -> decode TP1 as real processes. It generates transformers' own greedy tokens
(transformers reading the same GGUF itself), and the OpenAI client gets the same text back."""

from pathlib import Path

import pytest
import yaml

from kvferry.daemon.model import source
from kvferry.daemon.model.chat import ChatTemplate
from kvferry.daemon.model.tokenizer import load_tokenizer
from kvferry.daemon.server.config import load
from ports import free_port
from support.cluster import generate, running, wait_idle
from support.model_helpers import hf_greedy

LOCAL = Path(__file__).parents[3] / "deploy" / "local.yaml"
STEPS = 16
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm():
    """(our tokenizer, transformers' model, transformers' tokenizer, the model section)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read a GGUF
    model = load(LOCAL).daemons[0].model
    gguf = source.gguf_file(model.path)
    hf_args = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    hf = transformers.AutoModelForCausalLM.from_pretrained(**hf_args, dtype="float32").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(**hf_args)
    ours = load_tokenizer(model.checkpoint(), model.model_config().eos_token_ids)
    return ours, hf, hf_tokenizer, model


def test_the_converted_tokenizer_and_chat_template_match_transformers(smollm):
    ours, _, hf_tokenizer, model = smollm
    for text in ["Hello, world! 12345 apples in 2026.", "  naïve café\t\ttabs\n\n<|im_end|>"]:
        assert ours.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    rendered = ChatTemplate.of_checkpoint(model.checkpoint()).render(QUESTION)
    assert ours.encode(rendered) == hf_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert 2 in ours.eos_ids  # <|im_end|>, the end of an assistant turn


def test_prefill_tp3_to_decode_tp1_generates_transformers_greedy_tokens(smollm, tmp_path):
    ours, hf, _, model = smollm
    chat = ChatTemplate.of_checkpoint(model.checkpoint()).render(QUESTION)
    prompts = [ours.encode(chat), ours.encode("The KV cache of a long prompt"), list(range(40))]
    expected = [hf_greedy(hf, prompt, STEPS) for prompt in prompts]
    openai = pytest.importorskip("openai")
    with running(_local_on_free_ports(tmp_path)) as launcher:
        for prompt, want in zip(prompts, expected, strict=True):
            assert generate(launcher, "decode-0", prompt, max_tokens=STEPS).token_ids == want
        url = next(c.url for c in launcher.children if c.role == "decode")
        answer = openai.OpenAI(base_url=url + "/v1", api_key="unused").chat.completions.create(
            model=model.name, messages=QUESTION, max_tokens=STEPS, temperature=0
        )
        assert answer.choices[0].message.content == ours.decode(expected[0])
        wait_idle(launcher)


def _local_on_free_ports(tmp_path: Path) -> Path:
    deployment = yaml.safe_load(LOCAL.read_text())
    prefill, decode = deployment["daemons"]
    prefill.update(http_port=free_port(), bootstrap_port=free_port())
    decode.update(http_port=free_port(), prefill=[f"tcp://127.0.0.1:{prefill['bootstrap_port']}"])
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(deployment))
    return path
