"""A streamed answer's text, token by token (completions._Text): each step decodes only the
tokens since the last whole character, with a few before them as context, and what it sends
adds up to the whole answer's decode, for the byte tokenizer and for trained tokenizers of the
two common kinds (byte-level BPE, and SentencePiece-style pieces that spell a leading space)."""

import random

import pytest

from kvferry.daemon.model.tokenizer import ByteTokenizer, HFTokenizer
from kvferry.daemon.server.completions import _Text

TEXTS = [
    "plain words, one after another.",
    "naïve café — 東京 and Zürich; €5 or £3? 🙂🙂 ok",
    "  leading spaces,\n\nnew lines\tand tabs  ",
    "ααααα βββ γ 😀x😀y 😀",
]


def trained(kind: str, tmp_path) -> HFTokenizer:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>" if kind == "pieces" else None))
    if kind == "bytes":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = sorted(set("".join(TEXTS)))
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=alphabet, special_tokens=["<unk>"], show_progress=False
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path, frozenset())


def streamed(tokenizer, ids: list[int], steps: list[int]) -> str:
    """What a stream sends for `ids`, arriving in steps of the given sizes."""
    text, out, at = _Text(tokenizer, []), [], 0
    for size in steps:
        chunk, at = ids[at : at + size], at + size
        piece = text.add(chunk, at >= len(ids))
        if piece is not None:
            out.append(piece[0])
    return "".join(out)


@pytest.mark.parametrize("kind", ["byte", "bytes", "pieces"])
def test_the_streamed_text_adds_up_to_the_whole_decode(kind, tmp_path):
    tokenizer = ByteTokenizer() if kind == "byte" else trained(kind, tmp_path)
    rng = random.Random(0)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        whole = tokenizer.decode(ids)
        assert streamed(tokenizer, ids, [1] * len(ids)) == whole, text
        steps = [rng.randint(1, 4) for _ in ids]  # a stream that fell behind takes several
        assert streamed(tokenizer, ids, steps) == whole, text


def test_a_long_answer_decodes_a_window_per_step_not_the_whole_answer():
    class Counting(ByteTokenizer):
        decoded = 0

        def decode(self, ids):
            Counting.decoded += len(ids)
            return super().decode(ids)

    ids = list(b"one token at a time, for a while. ") * 30
    assert streamed(Counting(), ids, [1] * len(ids)) == ByteTokenizer().decode(ids)
    assert Counting.decoded < 8 * len(ids)  # the whole answer each step: len(ids)² / 2
