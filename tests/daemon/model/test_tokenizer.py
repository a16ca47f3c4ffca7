"""Which ids end a sequence, and what a checkpoint without a tokenizer does with text."""

import json

import pytest

from kvferry.daemon.model.tokenizer import ByteTokenizer, NoTokenizer, load_tokenizer


def test_the_random_model_takes_the_byte_tokenizer():
    tokenizer = load_tokenizer(None)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.eos_ids == {257}


def test_every_eos_the_checkpoint_names_ends_a_sequence(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    tokenizer = load_tokenizer(tmp_path, model_eos=(5,))
    assert isinstance(tokenizer, NoTokenizer) and tokenizer.eos_ids == {5, 7, 9}


def test_without_a_tokenizer_text_is_refused_naming_the_checkpoint(tmp_path):
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}.*no tokenizer.json.*token ids"):
        tokenizer.encode("hello")
    assert tokenizer.decode([1, 2, 3]) == ""


@pytest.mark.parametrize("eos", ['"2"', "[1, -1]", "true"])
def test_a_malformed_generation_config_is_named(tmp_path, eos):
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": {eos}}}')
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id="):
        load_tokenizer(tmp_path)
