"""Chat messages to one prompt: the checkpoint's chat template (`chat_template` in its
tokenizer_config.json, Jinja, rendered in a sandbox as Hugging Face does), else ChatML."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

# ChatML, for models whose checkpoint brings no template (the random embedded ones)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str = CHATML, bos: str = "", eos: str = "") -> None:
        self._template = _compile(source)
        self._bos, self._eos = bos, eos

    @classmethod
    def of_checkpoint(cls, model_path: str | Path | None) -> ChatTemplate:
        """The template in `model_path`'s tokenizer_config.json, else ChatML."""
        config = Path(model_path) / "tokenizer_config.json" if model_path else None
        if config is None or not config.exists():
            return cls()
        data = json.loads(config.read_text())
        source = data.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        return cls(
            source or CHATML, _token_text(data.get("bos_token")), _token_text(data.get("eos_token"))
        )

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages`, ending where the assistant's answer begins; ValueError
        when the template refuses them (say, roles out of order)."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except _TemplateRefusal as exc:
            raise ValueError(f"the chat template refused the messages: {exc}") from None


class _TemplateRefusal(Exception):
    pass


def _raise(message: str):
    raise _TemplateRefusal(message)


@cache
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def _token_text(token) -> str:
    if isinstance(token, dict):  # {"content": "<s>", ...}
        return token.get("content", "")
    return token or ""
