"""Tokenizers: the checkpoint's own (tokenizer.json via `tokenizers`), a byte-level one for the
random embedded model, or none for a checkpoint that ships no tokenizer (prompts must then be
token ids). Each maps text <-> token ids and knows the ids that end a sequence."""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """One token per UTF-8 byte; ids 256 and 257 are BOS and EOS."""

    bos_id, eos_id = 256, 257
    eos_ids = frozenset({eos_id})
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's tokenizer.json, through the `tokenizers` package."""

    def __init__(self, path: Path, eos_ids: frozenset[int]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_ids = eos_ids | _tokenizer_eos(path.parent, self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class NoTokenizer:
    """A checkpoint without tokenizer.json: text cannot be served faithfully, so text prompts
    are refused (ValueError, a 400) and answers carry token ids with empty text."""

    def __init__(self, checkpoint: Path, eos_ids: frozenset[int]) -> None:
        self.checkpoint, self.eos_ids = checkpoint, eos_ids

    def encode(self, text: str) -> list[int]:
        raise ValueError(
            f"the model's checkpoint ({self.checkpoint}) has no tokenizer.json: "
            "send the prompt as token ids"
        )

    def decode(self, ids: list[int]) -> str:
        return ""


def load_tokenizer(checkpoint: Path | None, model_eos: tuple[int, ...] = ()):
    """The tokenizer for `checkpoint` (a Hugging Face directory; None: the random model). Its
    `eos_ids` are every end id the checkpoint names: config.json's (`model_eos`),
    generation_config.json's and the tokenizer's eos_token."""
    if checkpoint is None:
        return ByteTokenizer()
    eos = frozenset(model_eos) | _generation_eos(checkpoint)
    if (checkpoint / "tokenizer.json").exists():
        return HFTokenizer(checkpoint / "tokenizer.json", eos)
    return NoTokenizer(checkpoint, eos)


def _generation_eos(checkpoint: Path) -> frozenset[int]:
    file = checkpoint / "generation_config.json"
    return frozenset(_ids(_fields(file).get("eos_token_id"), file))


def _tokenizer_eos(checkpoint: Path, tok) -> frozenset[int]:
    eos = _fields(checkpoint / "tokenizer_config.json").get("eos_token")
    text = eos.get("content") if isinstance(eos, dict) else eos
    token = tok.token_to_id(text) if isinstance(text, str) else None
    return frozenset() if token is None else frozenset({token})


def _fields(file: Path) -> dict:
    """A checkpoint's JSON file as a dict ({} when absent); ValueError naming it otherwise."""
    if not file.exists():
        return {}
    try:
        fields = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{file}: not a JSON object")
    return fields


def _ids(value, file: Path) -> list[int]:
    """eos_token_id as Hugging Face writes it: absent, one id, or a list of ids."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{file}: eos_token_id={value!r} is not a token id or a list of them")
    return ids
