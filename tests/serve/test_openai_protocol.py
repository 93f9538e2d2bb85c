"""OpenAI request and response shapes as pure functions (no Ray, no HTTP)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openlora_ray.engine.prompts import ChatPrompt
from openlora_ray.errors import InvalidRequestError
from openlora_ray.serve.openai_api import (
    MAX_CHOICES,
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    choice_seed,
)
from openlora_ray.serve.openai_responses import (
    ChoiceResult,
    ChunkWriter,
    completion_response,
    logprobs_body,
    total_usage,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **kw})


def error_of(exc: ValidationError) -> tuple[str, dict]:
    first = exc.errors()[0]
    return first["type"], first.get("ctx") or {}


def test_messages_take_content_parts_every_role_and_tool_calls():
    req = chat(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q", "name": "ann"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": [{"type": "text", "text": "r"}], "tool_call_id": "1"},
        ]
    )
    prompt = req.chat_prompt()
    assert isinstance(prompt, ChatPrompt) and prompt.add_generation_prompt and not prompt.continue_final_message
    system, user, assistant, tool = prompt.messages
    assert system == {"role": "system", "content": "a\nb"}
    assert user == {"role": "user", "content": "q", "name": "ann"}
    assert assistant["content"] == "" and assistant["tool_calls"][0]["function"]["name"] == "f"
    assert tool == {"role": "tool", "content": "r", "tool_call_id": "1"}
    assert req.prompt_chars() == len("a\nb") + 1 + 0 + 1


@pytest.mark.parametrize(
    "message, says",
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "input_audio"}]},
            "image_url, input_audio",
        ),
        ({"role": "tool", "content": "r"}, "tool_call_id"),
        ({"role": "user"}, "needs 'content'"),
        ({"role": "user", "content": "x", "tool_calls": [{"id": "1", "function": {"name": "f"}}]}, "only 'assistant'"),
        ({"role": "function", "content": "x"}, "developer"),
    ],
)
def test_bad_messages_name_what_is_wrong(message, says):
    with pytest.raises(ValidationError, match=says):
        chat(messages=[message])


@pytest.mark.parametrize(
    "field, value",
    [
        ("functions", [{}]),
        ("audio", {"voice": "alloy"}),
        ("modalities", ["audio"]),
        ("prediction", {"x": 1}),
        ("web_search_options", {"a": 1}),
        ("reasoning_effort", "low"),
        ("store", True),
        ("use_beam_search", True),
    ],
)
def test_known_but_unimplemented_chat_fields_are_refused_by_name(field, value):
    with pytest.raises(ValidationError) as caught:
        chat(**{field: value})
    kind, ctx = error_of(caught.value)
    assert kind == "unsupported_parameter" and ctx["param"] == field


@pytest.mark.parametrize("field, value", [("suffix", "x"), ("use_beam_search", True)])
def test_known_but_unimplemented_completion_fields_are_refused_by_name(field, value):
    with pytest.raises(ValidationError) as caught:
        CompletionRequest(model="m", prompt="x", **{field: value})
    assert error_of(caught.value) == ("unsupported_parameter", {"param": field, "value": repr(value)})


def test_no_op_values_and_unknown_vendor_fields_are_accepted():
    chat(
        logprobs=False,
        top_logprobs=0,
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0.0,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        modalities=["text"],
        store=False,
        skip_special_tokens=True,
        my_vendor_field=1,
    )
    CompletionRequest(model="m", prompt="x", echo=False, logprobs=None, best_of=2, n=2, suffix="")
    assert set(UNSUPPORTED) >= {
        "functions",
        "audio",
        "modalities",
        "prediction",
    }


def test_stream_options_need_stream():
    with pytest.raises(ValidationError) as caught:
        chat(stream_options={"include_usage": True})
    assert error_of(caught.value) == ("invalid_value", {"param": "stream_options"})
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage


def test_penalties_logit_bias_and_min_tokens_reach_the_sampling_params():
    params = chat(
        presence_penalty=0.5, frequency_penalty=-1, logit_bias={"42": -100, "7": 3.5}, min_tokens=4
    ).sampling(16)
    assert params.presence_penalty == 0.5 and params.frequency_penalty == -1.0 and params.min_tokens == 4
    assert params.logit_bias == {42: -100.0, 7: 3.5}  # JSON's string keys become token ids
    with pytest.raises(ValidationError, match="logit_bias"):
        chat(logit_bias={"not-a-token": 1})
    with pytest.raises(ValidationError, match="presence_penalty"):
        chat(presence_penalty=3)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        chat(logit_bias={"1": 101}).sampling(16)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        chat(min_tokens=9, max_tokens=8).sampling(16)


def test_engine_extras_reach_the_sampling_params():
    params = chat(ignore_eos=True, stop_token_ids=[5, 6], stop="x", top_k=-1, max_completion_tokens=7).sampling(99)
    assert params.ignore_eos and params.stop_token_ids == [5, 6] and params.stop == ["x"] and params.top_k == 0
    assert params.max_tokens == 7 and chat(max_tokens=3, max_completion_tokens=7).sampling(99).max_tokens == 3
    with pytest.raises(InvalidRequestError, match="stop"):
        chat(stop=[str(i) for i in range(17)]).sampling(16)  # above the engine's own bound: a 400, not a 500


def test_vllm_text_and_filter_extras_reach_the_sampling_params():
    params = chat(min_p=0.2, skip_special_tokens=False, include_stop_str_in_output=True).sampling(8)
    assert params.min_p == 0.2 and not params.skip_special_tokens and params.include_stop_str_in_output
    plain = chat().sampling(8)
    assert plain.skip_special_tokens and not plain.include_stop_str_in_output and "min_p" not in plain.model_fields_set
    with pytest.raises(ValidationError, match="min_p"):
        chat(min_p=1.5)


def test_echo_scores_the_prompt_and_max_tokens_0_needs_it():
    """lm-eval-harness's loglikelihood request: echo, logprobs and max_tokens 0."""
    params = CompletionRequest(model="m", prompt="x", echo=True, logprobs=1, max_tokens=0).sampling(16)
    assert params.max_tokens == 0 and params.prompt_logprobs == 1 and params.logprobs == 1
    assert CompletionRequest(model="m", prompt="x", echo=True).sampling(16).prompt_logprobs is None  # text only
    assert CompletionRequest(model="m", prompt="x", logprobs=1).sampling(16).prompt_logprobs is None
    # vLLM's prompt_logprobs field: scored once with echo's, the larger k; never streamed (as vLLM)
    both = CompletionRequest(model="m", prompt="x", echo=True, logprobs=1, prompt_logprobs=3, max_tokens=0)
    assert both.sampling(16).prompt_logprobs == 3 and chat(prompt_logprobs=0).sampling(8).prompt_logprobs == 0
    with pytest.raises(ValidationError) as caught:
        chat(prompt_logprobs=1, stream=True)
    assert error_of(caught.value) == ("invalid_value", {"param": "prompt_logprobs"})
    for unechoed in (lambda: CompletionRequest(model="m", prompt="x", max_tokens=0), lambda: chat(max_tokens=0)):
        with pytest.raises(ValidationError) as caught:
            unechoed()
        assert error_of(caught.value) == ("invalid_value", {"param": "max_tokens"})
    prompt = [
        {"token": "A", "logprob": None, "top": None, "prompt": True},
        {"token": " b", "logprob": -1.0, "top": [[" c", -0.5]], "prompt": True},
    ]
    assert logprobs_body([*prompt, {"token": "d", "logprob": -0.1, "top": [["d", -0.1]]}], chat=False) == {
        "tokens": ["A", " b", "d"],
        "token_logprobs": [None, -1.0, -0.1],
        "top_logprobs": [None, {" c": -0.5}, {"d": -0.1}],
        "text_offset": [0, 1, 3],
    }
    # best_of ranks by the completion's tokens only: the echoed prompt is the same for every candidate
    req = CompletionRequest(model="m", prompt="x", echo=True, best_of=2, logprobs=0)
    short = ChoiceResult(0, 0, "A bd", "length", 2, 1, [*prompt, {"token": "d", "logprob": -0.1, "top": []}])
    long = ChoiceResult(1, 0, "A bee", "length", 2, 2, [*prompt, *[{"token": "e", "logprob": -0.05, "top": []}] * 2])
    assert [r.text for r in req.pick([short, long])] == ["A bee"]


def test_prompt_lists_fan_out_with_openai_indexing_and_derived_seeds():
    req = CompletionRequest(model="m", prompt=["a", "b"], n=3, seed=9)
    choices = req.choices(16)
    assert [(c.index, c.prompt_index, c.prompt) for c in choices] == [(i, i // 3, "ab"[i // 3]) for i in range(6)]
    assert [c.params.seed for c in choices] == [9, choice_seed(9, 1), choice_seed(9, 2)] * 2
    assert len({choice_seed(9, j) for j in range(50)}) == 50 and all(
        0 <= choice_seed(-3, j) < 2**63 for j in range(1, 5)
    )
    assert CompletionRequest(model="m", prompt="x", n=2).choices(4)[1].params.seed is None  # unseeded stays random
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(model="m", prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    for bad in ("", [], ["a", ""], [[1], []]):
        with pytest.raises(ValidationError, match="empty"):
            CompletionRequest(model="m", prompt=bad)
    with pytest.raises(ValidationError, match=str(MAX_CHOICES)):
        CompletionRequest(model="m", prompt=["a"] * 65, n=2)


def test_tokenize_takes_a_prompt_or_messages():
    assert TokenizeRequest(prompt="x").to_prompt() == "x"
    chat_prompt = TokenizeRequest(messages=USER, tools=[{"type": "function"}], add_generation_prompt=False).to_prompt()
    assert chat_prompt.tools == ({"type": "function"},) and not chat_prompt.add_generation_prompt
    for kw in ({}, {"prompt": "x", "messages": USER}):
        with pytest.raises(ValidationError, match="either"):
            TokenizeRequest(**kw)


def test_responses_and_chunks_carry_each_choices_index():
    results = [
        ChoiceResult(index=1, prompt_index=0, text="b", finish_reason="length", prompt_tokens=4, completion_tokens=2),
        ChoiceResult(index=0, prompt_index=0, text="a", finish_reason="abort", prompt_tokens=4, completion_tokens=1),
        ChoiceResult(index=2, prompt_index=1, text="c", finish_reason="stop", prompt_tokens=6, completion_tokens=3),
    ]
    assert total_usage(results) == {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
    body = completion_response("id", "m", results, chat=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2] and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][2]["message"] == {"role": "assistant", "content": "c", "refusal": None}
    assert [c["text"] for c in completion_response("id", "m", results, chat=False)["choices"]] == ["a", "b", "c"]
    w = ChunkWriter(rid="id", model="m", chat=True, created=1)
    assert w.role(2)["choices"][0] == {
        "index": 2,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": None,
        "logprobs": None,
    }
    assert w.text(1, "", "stop")["choices"][0]["delta"] == {} and w.usage({"x": 1})["choices"] == []
    text = ChunkWriter(rid="id", model="m", chat=False, created=1).text(3, "t", None)
    assert text["object"] == "text_completion" and text["choices"][0]["index"] == 3


def test_log_probabilities_are_asked_of_the_engine_and_shaped_as_openai_does():
    assert chat(logprobs=True, top_logprobs=3).sampling(4).logprobs == 3
    assert chat(logprobs=True).sampling(4).logprobs == 0 and chat(logprobs=False).sampling(4).logprobs is None
    assert CompletionRequest(model="m", prompt="x", logprobs=2).sampling(4).logprobs == 2
    with pytest.raises(ValidationError) as caught:
        chat(top_logprobs=2)
    assert error_of(caught.value) == ("invalid_value", {"param": "top_logprobs"})
    with pytest.raises(ValidationError, match="less than or equal to 20"):
        CompletionRequest(model="m", prompt="x", logprobs=21)
    entries = [
        {"token": " a", "logprob": -0.5, "top": [[" a", -0.5], ["é", -1.5]]},
        {"token": "bc", "logprob": -2.0, "top": []},
    ]
    body = logprobs_body(entries, chat=True)
    assert body["content"][0] == {
        "token": " a",
        "logprob": -0.5,
        "bytes": [32, 97],
        "top_logprobs": [
            {"token": " a", "logprob": -0.5, "bytes": [32, 97]},
            {"token": "é", "logprob": -1.5, "bytes": [195, 169]},
        ],
    }
    assert logprobs_body(entries, chat=False, text_offset=5) == {
        "tokens": [" a", "bc"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{" a": -0.5, "é": -1.5}, {}],
        "text_offset": [5, 7],
    }
    assert logprobs_body(None, chat=True) is None


def test_best_of_runs_candidates_and_keeps_the_best_per_token():
    req = CompletionRequest(model="m", prompt=["a", "b"], n=1, best_of=3, seed=4)
    choices = req.choices(8)
    assert [(c.index, c.prompt_index) for c in choices] == [(i, i // 3) for i in range(6)]
    assert [c.params.seed for c in choices[:3]] == [4, choice_seed(4, 1), choice_seed(4, 2)]
    assert all(c.params.logprobs == 0 for c in choices)  # ranking needs them, even unasked

    def result(index: int, prompt: int, lps: list[float]) -> ChoiceResult:
        entries = [{"token": "t", "logprob": v, "top": []} for v in lps]
        return ChoiceResult(index, prompt, f"c{index}", "length", 3, len(lps), entries)

    every = [
        result(0, 0, [-1, -1]),
        result(1, 0, [-0.5]),
        result(2, 0, [-0.2, -3]),
        result(3, 1, [-2]),
        result(4, 1, [-1.5, -1.5]),
        result(5, 1, [-9]),
    ]
    best = req.pick(every)
    assert [(r.index, r.text, r.logprobs) for r in best] == [
        (0, "c1", None),
        (1, "c4", None),
    ]  # mean per token; unasked: none
    with_lp = CompletionRequest(model="m", prompt=["a", "b"], best_of=3, logprobs=1).pick(every)
    assert (
        with_lp[0].logprobs == every[1].logprobs
        and CompletionRequest(model="m", prompt="a", n=2, best_of=2).pick(every) == every
    )
    for bad, says in (({"n": 3, "best_of": 2}, "at least"), ({"best_of": 2, "stream": True}, "streamed")):
        with pytest.raises(ValidationError, match=says):
            CompletionRequest(model="m", prompt="x", **bad)
