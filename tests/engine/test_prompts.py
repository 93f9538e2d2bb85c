"""Chat-template rendering with real tokenizers: SmolLM2's (no tool format) and a Hermes-style one."""

from __future__ import annotations

from pathlib import Path

import pytest

from openlora_ray.engine.prompts import ChatPrompt, encode_prompt
from openlora_ray.errors import InvalidRequestError

CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
HISTORY = (
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "rain", "tool_call_id": "c1"},
)
# A minimal template in the Hermes/Qwen manner: renders tools and tool_calls (arguments as a dict).
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ c.function.name }} {{ c.function.arguments.city }}</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def text_of(tokenizer, prompt) -> str:
    return tokenizer.decode(encode_prompt(tokenizer, len(tokenizer), prompt))


def test_plain_message_lists_still_render(tokenizer):
    as_list = encode_prompt(tokenizer, len(tokenizer), [{"role": "user", "content": "hi"}])
    assert as_list == encode_prompt(
        tokenizer, len(tokenizer), ChatPrompt(messages=({"role": "user", "content": "hi"},))
    )
    assert tokenizer.decode(as_list).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tool_calls_become_text_for_a_template_without_a_tool_format(tokenizer):
    text = text_of(tokenizer, ChatPrompt(messages=HISTORY))
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
        in text
    )
    assert "<|im_start|>tool\nrain<|im_end|>" in text


def test_a_template_with_a_tool_format_gets_tools_and_dict_arguments(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = TOOL_TEMPLATE
    tools = ({"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},)
    text = text_of(tokenizer, ChatPrompt(messages=HISTORY, tools=tools))
    assert text.startswith('<tools>[{"type": "function"') and "<tool_call>weather Oslo</tool_call>" in text


def test_continuing_the_final_message_and_template_kwargs(tokenizer):
    partial = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I am"})
    text = text_of(
        tokenizer,
        ChatPrompt(
            messages=partial,
            add_generation_prompt=False,
            continue_final_message=True,
            template_kwargs={"tokenize": False},
        ),
    )
    assert text.endswith("<|im_start|>assistant\nHello, I am")  # left open for the model to continue
    with pytest.raises(InvalidRequestError, match="cannot both"):
        encode_prompt(tokenizer, len(tokenizer), ChatPrompt(messages=partial, continue_final_message=True))
    with pytest.raises(InvalidRequestError, match="assistant message last"):
        encode_prompt(
            tokenizer,
            len(tokenizer),
            ChatPrompt(messages=partial[:1], add_generation_prompt=False, continue_final_message=True),
        )


def test_a_template_that_refuses_the_messages_is_a_request_error(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    with pytest.raises(InvalidRequestError, match="no tool role"):
        encode_prompt(tokenizer, len(tokenizer), ChatPrompt(messages=HISTORY))


def test_token_ids_are_checked_against_the_vocabulary(tokenizer):
    assert encode_prompt(tokenizer, 10, [1, 2, 9]) == [1, 2, 9]
    with pytest.raises(InvalidRequestError, match=r"\[0, 10\)"):
        encode_prompt(tokenizer, 10, [10])
