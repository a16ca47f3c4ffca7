"""Tokenizers: the checkpoint's own (tokenizer.json via `tokenizers`) or a byte-level one for
the random embedded model. Both map text <-> token ids and know their end-of-sequence id."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """One token per UTF-8 byte; ids 256 and 257 are BOS and EOS."""

    bos_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's tokenizer.json, through the `tokenizers` package."""

    def __init__(self, path: Path, eos_id: int | None) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.eos_id = eos_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(model_path: str | Path | None, eos_id: int | None = None):
    """The checkpoint's tokenizer when it ships a tokenizer.json, else the byte tokenizer."""
    if model_path is not None and (Path(model_path) / "tokenizer.json").exists():
        return HFTokenizer(Path(model_path) / "tokenizer.json", eos_id)
    return ByteTokenizer()
