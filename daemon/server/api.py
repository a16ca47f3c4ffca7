"""The HTTP API's request bodies, shared by the daemon's front (which decodes them) and the
client (which sends them). msgspec only, so the CLI imports it without the engine."""

from __future__ import annotations

import msgspec


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of an OpenAI completion request kvferry uses (others are ignored)."""

    prompt: str | list[int]  # text, or token ids
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
