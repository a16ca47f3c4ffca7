"""Chat messages to a prompt: the checkpoint's template when it has one, ChatML otherwise."""

import json

import pytest

from kvferry.daemon.model.chat import ChatTemplate

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_without_a_checkpoint_template_messages_become_chatml(tmp_path):
    for template in (
        ChatTemplate(),
        ChatTemplate.of_checkpoint(tmp_path),
        ChatTemplate.of_checkpoint(None),
    ):
        assert template.render(MESSAGES) == (
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\n"
        )


def test_a_checkpoint_template_is_rendered_with_its_tokens_and_may_refuse(tmp_path):
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}[{{ m['content'] }}]{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    config = {"chat_template": source, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.of_checkpoint(tmp_path)
    assert template.render(MESSAGES[1:]) == "<s>[hi]>"
    with pytest.raises(ValueError, match="no system role"):
        template.render(MESSAGES)


def test_a_template_cannot_reach_outside_its_sandbox():
    from jinja2.exceptions import SecurityError

    sneaky = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        sneaky.render(MESSAGES)
