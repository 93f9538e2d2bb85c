"""The OpenAI API as real clients send it: the official SDK, LangChain and LiteLLM over HTTP.

One local application (auth off, as ``make run`` serves it) on a real local Ray cluster: content
parts and every role, ``n`` with seeds, prompt lists, streaming with an ``index`` on every chunk,
the endpoints SDKs and tools probe, refusals that name the field, and 48 concurrent streams.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from peft_helpers import save_peft_adapter

pytestmark = pytest.mark.timeout(240)

BASE = "tiny"
CHAT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def store(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    root = tmp_path_factory.mktemp("client-store")
    (root / "adapters").mkdir()
    store = AdapterStore(StoreSettings(uri=str(root / "adapters"), cache_dir=root / "push-cache"))
    work = tmp_path_factory.mktemp("client-adapters")
    for name, r, seed in (("alpha", 4, 71), ("beta", 8, 72), ("toolarge", 16, 73)):  # toolarge: above max_rank
        store.push(
            save_peft_adapter(tiny_chat_model_dir, work / name, r, 8.0, ("q_proj", "v_proj"), seed), f"{name}@v1"
        )
    return root / "adapters"


@pytest.fixture(scope="module")
def url(serve_url: str, tiny_chat_model_dir: Path, store: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from ray import serve

    from openlora_ray.serve.app import build
    from openlora_ray.serve.config import AppConfig

    cfg = AppConfig(
        model=str(tiny_chat_model_dir),
        served_model_name=BASE,
        engine={"num_slots": 2, "max_rank": 8, "max_running": 8, "max_seq_len": 192, "torch_threads": 1},
        store={"uri": str(store), "cache_dir": str(tmp_path_factory.mktemp("node-cache"))},
        replicas={
            "num_replicas": 1,
            "num_cpus": 0,
            "num_gpus": 0,
            "stats_period_s": 0.5,
            "graceful_shutdown_timeout_s": 1,
        },
        ingress_num_cpus=0,
        auth={"enabled": False},
    )
    serve.run(build(cfg), name="clients", route_prefix="/")
    return serve_url


@pytest.fixture(scope="module")
def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60)


# ------------------------------------------------------------------------------ official SDK
def test_content_parts_every_role_and_names(client):
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "name": "ann",
            "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "the weather?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "assistant", "content": "It rains."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    for model in (BASE, "alpha"):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
        assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    # Parts equal the same text sent as a string (joined by newlines); developer equals system.
    as_parts = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=6,
        temperature=0,
    )
    as_text = client.chat.completions.create(
        model=BASE, messages=[{"role": "system", "content": "a\nb"}], max_tokens=6, temperature=0
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_non_text_parts_and_bad_messages_are_400_naming_them(client):
    import openai

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, image]}], max_tokens=2
        )
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model=BASE, messages=[{"role": "tool", "content": "rain"}], max_tokens=2)


def test_n_choices_with_a_seed_are_reproducible(client):
    kw = dict(model="alpha", messages=CHAT, max_tokens=12, temperature=1.0, seed=1234)
    first = client.chat.completions.create(n=3, **kw)
    again = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert client.chat.completions.create(**kw).choices[0].message.content == texts[0]  # choice 0 uses the seed itself
    assert (
        first.usage.prompt_tokens == client.chat.completions.create(**kw).usage.prompt_tokens
    )  # the prompt counts once

    stream = client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw)
    pieces: dict[int, str] = {0: "", 1: "", 2: ""}
    finished, usage = set(), None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert [pieces[i] for i in range(3)] == texts and finished == {0, 1, 2}
    assert (
        usage.completion_tokens == first.usage.completion_tokens and usage.prompt_tokens == first.usage.prompt_tokens
    )


def test_completions_prompt_lists_index_as_openai_does(url, client):
    prompts = ["The sky is", "Once upon a time", "1 2 3"]
    single = [
        client.completions.create(model="beta", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts
    ]
    r = client.completions.create(model="beta", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [t for t in single for _ in range(2)]  # prompt p's j-th choice is p*n+j
    tokenized = [post(url, "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    as_ids = client.completions.create(model="beta", prompt=tokenized, max_tokens=6, temperature=0)
    assert [c.text for c in as_ids.choices] == single
    one = client.completions.create(
        model="beta", prompt=tokenized[0], max_tokens=6, temperature=0
    )  # a single list[int]
    assert [c.text for c in one.choices] == single[:1]

    texts = {i: "" for i in range(3)}
    for chunk in client.completions.create(model="beta", prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[i] for i in range(3)] == single


def test_best_of_answers_the_candidates_with_the_best_log_probability_per_token(client):
    kw = dict(model="beta", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=99)
    three = client.completions.create(n=3, logprobs=0, **kw)  # the same seeds as best_of's candidates
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in three.choices]
    ranked = [three.choices[i].text for i in sorted(range(3), key=lambda i: -means[i])]
    best = client.completions.create(best_of=3, **kw)
    assert [c.text for c in best.choices] == ranked[:1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == three.usage.completion_tokens  # every candidate counts
    two = client.completions.create(best_of=3, n=2, logprobs=0, **kw)
    assert [(c.index, c.text) for c in two.choices] == [(0, ranked[0]), (1, ranked[1])] and two.choices[0].logprobs


def test_unimplemented_fields_are_400_naming_them(url, client):
    import openai

    chat = {"model": BASE, "messages": CHAT, "max_tokens": 2}
    refused = {
        "functions": [{"name": "f", "parameters": {}}],
        "audio": {"voice": "alloy"},
        "modalities": ["text", "audio"],
        "prediction": {"type": "content", "content": "x"},
    }
    for field, value in refused.items():
        r = post(url, "/v1/chat/completions", {**chat, field: value})
        err = r.json()["error"]
        assert (
            r.status_code == 400
            and err["param"] == field
            and err["code"] == "unsupported_parameter"
            and field in err["message"]
        ), (field, r.text)
    for field, value in {"suffix": "end", "use_beam_search": True}.items():
        r = post(url, "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    # The no-op values of those fields, and vendor fields nobody knows, are accepted.
    noop = {
        "logprobs": False,
        "logit_bias": {},
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "some_vendor_flag": {"x": 1},
    }
    assert post(url, "/v1/chat/completions", {**chat, **noop}).status_code == 200
    r = post(url, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError, match="audio"):
        client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=2, audio={"voice": "alloy", "format": "wav"})


def test_penalties_logit_bias_and_min_tokens(url, client):
    """The tiny model's logits spread well under 1, so a bias of 5 decides every greedy token."""
    import openai

    (river,) = post(url, "/tokenize", {"prompt": " river"}).json()["tokens"]
    kw = dict(model="alpha", prompt="Count:", max_tokens=8, temperature=0, logit_bias={str(river): 5})
    assert client.completions.create(**kw).choices[0].text == " river" * 8
    assert (
        client.completions.create(presence_penalty=2.0, **kw).choices[0].text == " river" * 8
    )  # -2 once: still ahead
    penalised = client.completions.create(frequency_penalty=2.0, **kw).choices[0].text
    assert 1 <= penalised.count(" river") < 8  # -2 per occurrence: overtaken after a few
    (eos,) = post(url, "/tokenize", {"prompt": "<|im_end|>"}).json()["tokens"]
    ends = dict(model="alpha", prompt="Count:", max_tokens=12, temperature=0, logit_bias={str(eos): 100})
    assert client.completions.create(**ends).usage.completion_tokens <= 1
    held = client.completions.create(extra_body={"min_tokens": 5}, **ends)
    assert held.usage.completion_tokens >= 5 and held.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model=BASE, prompt="x", max_tokens=2, logit_bias={str(10**7): 1})


def test_engine_extras_pass_through(url):
    body = {"model": BASE, "prompt": "Count:", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    r = post(url, "/v1/completions", body).json()
    assert r["usage"]["completion_tokens"] == 24 and r["choices"][0]["finish_reason"] == "length"
    first = post(url, "/v1/completions", {**body, "max_tokens": 4}).json()["choices"][0]["text"]
    ids = post(url, "/tokenize", {"model": BASE, "prompt": first}).json()["tokens"]
    stopped = post(url, "/v1/completions", {**body, "stop_token_ids": ids}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] < 24


def test_max_tokens_left_out_means_as_many_as_fit_the_context(client):
    import openai

    long = [{"role": "user", "content": "Tell me a story about " + "a river and a stone, " * 20}]
    r = client.chat.completions.create(model="alpha", messages=long, temperature=0)  # the default 256 would not fit
    assert r.usage.prompt_tokens > 100 and r.usage.total_tokens <= 192  # the test app's context: 192 tokens
    with pytest.raises(openai.BadRequestError, match="context"):  # asked for explicitly, it is refused
        client.chat.completions.create(model="alpha", messages=long, max_tokens=256)


def test_log_probabilities_are_the_models_own(client, tiny_chat_model_dir):
    """Greedy tokens with their log probabilities and top 3, against the model's own log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32).eval()
    ids, want = list(tokenizer("The sky is").input_ids), []
    with torch.no_grad():
        for _ in range(6):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            top = torch.topk(logp, 3)
            want.append([(tokenizer.decode([int(i)]), float(v)) for i, v in zip(top.indices, top.values, strict=True)])
            ids.append(int(top.indices[0]))
    kw = dict(model=BASE, prompt="The sky is", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    got = client.completions.create(logprobs=3, **kw).choices[0].logprobs
    assert got.tokens == [w[0][0] for w in want]
    assert all(abs(a - w[0][1]) < 1e-4 for a, w in zip(got.token_logprobs, want, strict=True))
    for top, w in zip(got.top_logprobs, want, strict=True):
        assert sorted(top) == sorted(t for t, _ in w) and all(abs(top[t] - v) < 1e-4 for t, v in w)
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(6)]
    streamed = [c.choices[0].logprobs for c in client.completions.create(logprobs=3, stream=True, **kw) if c.choices]
    assert [t for s in streamed if s for t in s.tokens] == got.tokens
    assert [o for s in streamed if s for o in s.text_offset] == got.text_offset

    chat = dict(model="alpha", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = client.chat.completions.create(**chat).choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(
        c.token == c.top_logprobs[0].token and abs(c.logprob - c.top_logprobs[0].logprob) < 1e-6 for c in content
    )
    assert all(bytes(c.bytes) == c.token.encode() for c in content)
    deltas = [c.choices[0].logprobs for c in client.chat.completions.create(stream=True, **chat) if c.choices]
    assert [t.token for d in deltas if d for t in d.content] == [c.token for c in content]


def test_echo_scores_the_prompt_as_lm_eval_harness_asks(client, tiny_chat_model_dir, tmp_path):
    """echo + logprobs: the prompt's tokens with the model's own log-softmax (the first has none),
    base and adapter (alpha: r 4, alpha 8, non-zero B) against transformers and PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32).eval()
    peft_dir = save_peft_adapter(tiny_chat_model_dir, tmp_path / "alpha", 4, 8.0, ("q_proj", "v_proj"), 71)
    refs = {BASE: base, "alpha": PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32), peft_dir).eval()}
    prompt = "The river runs past the old stone bridge"
    ids = tokenizer(prompt).input_ids
    for model, ref in refs.items():
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # row i scores token i + 1
        got = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
        choice = got.choices[0]
        assert choice.text == prompt and got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(ids)
        lp = choice.logprobs
        assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None and lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
        for p in range(1, len(ids)):
            assert abs(lp.token_logprobs[p] - float(want[p - 1, ids[p]])) < 1e-4, (model, p)
            top = want[p - 1].topk(2)
            assert sorted(lp.top_logprobs[p].values()) == pytest.approx(sorted(top.values.tolist()), abs=1e-4)
        # lm-eval-harness's own request: token ids, max_tokens 1, the continuation's sum read back
        one = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
        lp1 = one.choices[0].logprobs
        assert one.choices[0].text.startswith(tokenizer.decode(ids)) and len(lp1.tokens) == len(ids) + 1
        continuation = sum(lp1.token_logprobs[4 : len(ids)])
        assert continuation == pytest.approx(sum(float(want[p - 1, ids[p]]) for p in range(4, len(ids))), abs=1e-3)
        assert lp1.token_logprobs[-1] == pytest.approx(float(want[-1].max()), abs=1e-4)  # the greedy token
        assert lp1.text_offset == [sum(map(len, lp1.tokens[:i])) for i in range(len(ids) + 1)]
    kw = dict(model="alpha", prompt=prompt, echo=True, logprobs=1, max_tokens=4, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text and whole.text.startswith(prompt)
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == whole.logprobs.text_offset
    plain = client.completions.create(model=BASE, prompt=prompt, echo=True, max_tokens=3, temperature=0).choices[0]
    assert plain.text.startswith(prompt) and plain.logprobs is None


def test_vllm_prompt_logprobs_are_the_models_own(client, tiny_chat_model_dir):
    """vLLM's ``prompt_logprobs: k`` on completions (per choice, a prompt list's each its own) and
    chat (beside the choices, the rendered conversation's tokens): per token after the first,
    {id: {logprob, rank, decoded_token}} for the token and the k most likely, against the model's
    own log-softmax; beside echo's own k; refused when streamed."""
    import openai
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openlora_ray.engine.prompts import ChatPrompt, render_chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32).eval()

    def check(got: list, ids: list[int], k: int) -> None:
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # row i scores token i + 1
        assert len(got) == len(ids) and got[0] is None
        for p in range(1, len(ids)):
            row, top = want[p - 1], want[p - 1].topk(k)
            mine = got[p][str(ids[p])]
            assert abs(mine["logprob"] - float(row[ids[p]])) < 1e-4
            assert mine["decoded_token"] == tokenizer.decode([ids[p]])
            above = [1 + int((row > row[ids[p]] + d).sum()) for d in (1e-4, -1e-4)]  # near-ties: float noise
            assert above[0] <= mine["rank"] <= above[1]
            for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), start=1):
                assert got[p][str(t)]["rank"] == rank and abs(got[p][str(t)]["logprob"] - v) < 1e-4
            assert len(got[p]) <= k + 1

    prompts = ["The river runs past the old stone bridge", "A cat"]
    r = client.completions.create(
        model=BASE, prompt=prompts, max_tokens=2, temperature=0, echo=True, logprobs=1,
        extra_body={"prompt_logprobs": 3},
    )
    for choice, prompt in zip(r.choices, prompts, strict=True):
        ids = tokenizer(prompt).input_ids
        check(choice.model_extra["prompt_logprobs"], ids, k=3)
        assert all(len(t) == 1 for t in choice.logprobs.top_logprobs[1:])  # echo keeps its own k
    chat = client.chat.completions.create(
        model=BASE, messages=CHAT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 0}
    )
    ids = render_chat(tokenizer, ChatPrompt(messages=tuple(CHAT)))
    check(chat.model_extra["prompt_logprobs"], ids, k=0)
    assert chat.usage.prompt_tokens == len(ids) and "prompt_logprobs" not in chat.choices[0].model_extra
    plain = client.completions.create(model=BASE, prompt="A cat", max_tokens=2)
    assert "prompt_logprobs" not in plain.choices[0].model_extra  # only when asked for
    for bad in ({"prompt_logprobs": 1, "stream": True}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}):
        with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
            client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=2, extra_body=bad)

def test_min_p_special_tokens_and_the_stop_string_in_the_output(url, client):
    """vLLM's min_p, skip_special_tokens and include_stop_str_in_output, streamed and not."""
    kw = dict(model="alpha", prompt="Once upon a time", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    sampled = {client.completions.create(temperature=1.5, seed=s, **kw).choices[0].text for s in range(3)}
    assert sampled != {greedy}  # the tiny model's distribution is flat: sampling wanders off
    for s in range(3):  # min_p 1 keeps only the top token: sampling is greedy
        only_top = client.completions.create(temperature=1.5, seed=s, model="alpha", prompt="Once upon a time",
                                             max_tokens=8, extra_body={"ignore_eos": True, "min_p": 1.0})
        assert only_top.choices[0].text == greedy

    (start,) = post(url, "/tokenize", {"prompt": "<|im_start|>"}).json()["tokens"]  # special, not an end
    special = dict(model=BASE, prompt="Hi", max_tokens=3, temperature=0, logit_bias={str(start): 100})
    assert client.completions.create(**special).choices[0].text == ""
    kept = client.completions.create(extra_body={"skip_special_tokens": False}, **special)
    assert kept.choices[0].text == "<|im_start|>" * 3
    streamed = client.completions.create(stream=True, extra_body={"skip_special_tokens": False}, **special)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "<|im_start|>" * 3

    stop = greedy[3:7]
    at = greedy.find(stop)
    for include, want in ((False, greedy[:at]), (True, greedy[: at + len(stop)])):
        extra = {"ignore_eos": True, "include_stop_str_in_output": include}
        args = dict(model="alpha", prompt="Once upon a time", max_tokens=8, temperature=0, stop=[stop], extra_body=extra)
        whole = client.completions.create(**args).choices[0]
        assert (whole.text, whole.finish_reason) == (want, "stop")
        chunks = client.completions.create(stream=True, **args)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_model_retrieval_health_and_openai_error_bodies(url, client):
    import openai

    assert client.models.retrieve(BASE).id == BASE
    alpha = client.models.retrieve("alpha")
    assert alpha.id == "alpha" and alpha.model_extra["parent"] == BASE
    assert client.models.retrieve("alpha@v1").id == "alpha@v1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    missing = requests.get(url + "/v1/no-such-route", timeout=10)
    assert (
        missing.status_code == 404
        and missing.json()["error"]["code"] == "not_found"
        and "detail" not in missing.json()
    )
    wrong = requests.get(url + "/v1/chat/completions", timeout=10)
    assert (
        wrong.status_code == 405
        and wrong.json()["error"]["code"] == "method_not_allowed"
        and "POST" in wrong.headers["allow"]
    )
    bad_json = requests.post(
        url + "/v1/completions", data=b"{", headers={"content-type": "application/json"}, timeout=10
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"


def test_an_adapter_that_cannot_be_served_is_a_bad_request(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="toolarge", prompt="x", max_tokens=2)
    assert (
        caught.value.status_code == 400
        and caught.value.code == "invalid_adapter"
        and "rank 16" in caught.value.message
    )


def test_tokenize_and_detokenize(url):
    r = post(url, "/tokenize", {"model": "alpha", "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 192 and len(r["token_strs"]) == r["count"]
    assert post(url, "/detokenize", {"model": "alpha", "tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = post(url, "/tokenize", {"model": BASE, "messages": CHAT}).json()
    completion = post(url, "/v1/chat/completions", {"model": BASE, "messages": CHAT, "max_tokens": 1}).json()
    assert chat["count"] == completion["usage"]["prompt_tokens"]  # what the engine saw
    text = post(url, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "Tell me a story" in text
    tools = [
        {
            "type": "function",
            "function": {"name": "weather", "description": "w", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    assert post(url, "/tokenize", {"messages": CHAT, "tools": tools}).status_code == 200
    assert post(url, "/tokenize", {"model": "no-such-adapter", "prompt": "x"}).status_code == 404
    assert post(url, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert post(url, "/tokenize", {"prompt": "x", "messages": CHAT}).status_code == 400


def test_48_concurrent_streams_are_all_answered_in_local_mode(client):
    def stream(i: int) -> str:
        chunks = client.chat.completions.create(
            model=("alpha", "beta", BASE)[i % 3], messages=CHAT, max_tokens=6, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(48) as pool:
        texts = list(pool.map(stream, range(48)))
    assert len(texts) == 48 and all(isinstance(t, str) for t in texts)
    assert len({texts[i] for i in range(0, 48, 3)}) == 1  # the same request got the same greedy answer each time


# ------------------------------------------------------------------------------- LangChain
def test_langchain_chat_openai_invoke_stream_batch(url, client):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="alpha", temperature=0, max_tokens=8, max_retries=0)
    plain = (
        client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )
    assert llm.invoke("Tell me a story").content == plain
    assert "".join(chunk.content for chunk in llm.stream("Tell me a story")) == plain
    answers = llm.batch(["Tell me a story", "Tell me a joke", [SystemMessage("Be brief."), HumanMessage("Hi")]])
    assert len(answers) == 3 and answers[0].content == plain
    two = ChatOpenAI(
        base_url=url + "/v1", api_key="unused", model=BASE, n=2, temperature=1.0, seed=5, max_tokens=6, max_retries=0
    )
    result = two.generate([[HumanMessage("Hi")]])
    assert len(result.generations[0]) == 2


def test_langchain_completions_llm_sends_prompt_lists(url, client):
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=url + "/v1", api_key="unused", model="beta", temperature=0, max_tokens=6, max_retries=0)
    prompts = ["The sky is", "Once upon a time"]
    single = [
        client.completions.create(model="beta", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts
    ]
    assert [g[0].text for g in llm.generate(prompts).generations] == single
    assert llm.invoke(prompts[0]) == single[0]
    assert llm.batch(prompts) == single


# --------------------------------------------------------------------------------- LiteLLM
@pytest.fixture(scope="module")
def litellm():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no download of the price list at import
    import litellm

    litellm.telemetry = False
    return litellm


def test_litellm_completion_streaming_and_async(url, client, litellm):
    kw = dict(model="openai/alpha", api_base=url + "/v1", api_key="unused", messages=CHAT, max_tokens=8, temperature=0)
    plain = (
        client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )
    assert litellm.completion(**kw).choices[0].message.content == plain
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(stream=True, **kw))
    assert streamed == plain

    async def both() -> list[str]:
        answers = await asyncio.gather(
            litellm.acompletion(**kw), litellm.acompletion(**{**kw, "model": "openai/" + BASE})
        )
        return [a.choices[0].message.content for a in answers]

    assert asyncio.run(both())[0] == plain
    r = litellm.text_completion(
        model="openai/beta", api_base=url + "/v1", api_key="unused", prompt="The sky is", max_tokens=6, temperature=0
    )
    assert (
        r.choices[0].text
        == client.completions.create(model="beta", prompt="The sky is", max_tokens=6, temperature=0).choices[0].text
    )
    assert json.loads(r.model_dump_json())["choices"][0]["index"] == 0
