"""The HTTP API's request bodies, shared by the daemon's front (which decodes them) and the
client (which sends them). msgspec only, so the CLI imports it without the engine.

Every parameter OpenAI defines for an endpoint is known here: those kvferry cannot honour are
refused by name (`unsupported`), and an unknown one by msgspec (`forbid_unknown_fields`) — none
is silently ignored. `model` is accepted whatever it names (one daemon serves one model).
Parameters left UNSET are not sent by kvferry's client."""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType

MAX_STOP = 16  # stop strings or stop token ids per request


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Sampling(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What completions and chat completions share."""

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
    presence_penalty: float | UnsetType | None = UNSET
    frequency_penalty: float | UnsetType | None = UNSET
    logit_bias: dict[str, float] | UnsetType | None = UNSET

    # parameter -> the values kvferry can honour (None and UNSET always)
    _ALLOWED = {
        "n": (1,),
        "presence_penalty": (0,),
        "frequency_penalty": (0,),
        "logit_bias": ({},),
    }

    def unsupported(self) -> str | None:
        """Why this request asks for something kvferry does not do, naming the parameter and
        its value; None when it can be served."""
        for name, values in self._ALLOWED.items():
            value = getattr(self, name)
            if value is not UNSET and value is not None and value not in values:
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

    @property
    def token_limit(self) -> int:
        return self.max_tokens


class CompletionRequest(_Sampling, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's `POST /v1/completions`."""

    prompt: str | list[int]  # text, or token ids
    best_of: int | UnsetType | None = UNSET
    echo: bool | UnsetType | None = UNSET
    suffix: str | UnsetType | None = UNSET
    logprobs: int | UnsetType | None = UNSET

    _ALLOWED = {
        **_Sampling._ALLOWED,
        "best_of": (1,),
        "echo": (False,),
        "suffix": (),
        "logprobs": (),
    }


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str  # system, user or assistant (the template decides what it accepts)
    content: str
    name: str | UnsetType | None = UNSET


class ChatCompletionRequest(_Sampling, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's `POST /v1/chat/completions`: the messages go through the model's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | UnsetType | None = UNSET  # OpenAI's newer name of max_tokens
    logprobs: bool | UnsetType | None = UNSET
    top_logprobs: int | UnsetType | None = UNSET
    tools: list | UnsetType | None = UNSET
    tool_choice: str | dict | UnsetType | None = UNSET
    parallel_tool_calls: bool | UnsetType | None = UNSET
    response_format: dict | UnsetType | None = UNSET

    _ALLOWED = {
        **_Sampling._ALLOWED,
        "logprobs": (False,),
        "top_logprobs": (),
        "tools": ([],),
        "tool_choice": ("none",),
        "parallel_tool_calls": (),
        "response_format": ({"type": "text"},),
    }

    @property
    def token_limit(self) -> int:
        limit = self.max_completion_tokens
        return self.max_tokens if limit is UNSET or limit is None else limit
