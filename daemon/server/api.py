"""The HTTP API's request bodies, shared by the daemon's front (which decodes them) and the
client (which sends them). msgspec only, so the CLI imports it without the engine."""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType

MAX_STOP = 16  # stop strings or stop token ids per request


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_usage: bool = False  # a last chunk with the usage and no choices


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An OpenAI completion request. Every parameter OpenAI defines is known here: those kvferry
    cannot honour are refused by name (`unsupported`) and an unknown one by msgspec — none is
    ignored. `model` is accepted whatever it names (one daemon serves one model). Parameters
    left UNSET are not sent by kvferry's client."""

    prompt: str | list[int]  # text, or token ids
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    model: str | UnsetType | None = UNSET
    stream_options: StreamOptions | UnsetType | None = UNSET
    stop: str | list[str] | UnsetType | None = UNSET  # the answer ends before the first of these
    stop_token_ids: list[int] | UnsetType | None = UNSET  # ... or with the first of these (vLLM)
    user: str | UnsetType | None = UNSET  # the caller's tag: accepted, not used
    n: int | UnsetType | None = UNSET
    best_of: int | UnsetType | None = UNSET
    echo: bool | UnsetType | None = UNSET
    suffix: str | UnsetType | None = UNSET
    logprobs: int | UnsetType | None = UNSET
    presence_penalty: float | UnsetType | None = UNSET
    frequency_penalty: float | UnsetType | None = UNSET
    logit_bias: dict[str, float] | UnsetType | None = UNSET

    def unsupported(self) -> str | None:
        """Why this request asks for something kvferry does not do, naming the parameter and
        its value; None when it can be served."""
        allowed = {
            "n": (None, 1),
            "best_of": (None, 1),
            "echo": (None, False),
            "suffix": (None,),
            "logprobs": (None,),
            "presence_penalty": (None, 0),
            "frequency_penalty": (None, 0),
            "logit_bias": (None, {}),
        }
        for name, values in allowed.items():
            value = getattr(self, name)
            if value is not UNSET and value not in values:
                return f"{name}={value!r} is not supported"
        if self.include_usage and not self.stream:
            return "stream_options is only allowed with stream=true"
        if len(self.stop_strings) > MAX_STOP or len(self.stop_ids) > MAX_STOP:
            return f"at most {MAX_STOP} stop strings and {MAX_STOP} stop_token_ids"
        if "" in self.stop_strings:
            return "stop strings must not be empty"
        return None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self.stop_token_ids or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options) and self.stream_options.include_usage
