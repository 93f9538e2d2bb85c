"""OpenAI's request shapes for completions and chat (and vLLM's for /tokenize, /detokenize).

Requests are pydantic models. Unknown fields are ignored, as clients send many vendor extras; but
a *known* OpenAI field the server does not implement is refused with a 400 that names it (see
``UNSUPPORTED``) unless it carries its no-op default, so nobody gets plain text where they asked
for log probabilities or JSON. What the engine supports passes through to ``SamplingParams``:
OpenAI's penalties and ``logit_bias``, vLLM's ``ignore_eos``, ``stop_token_ids``, ``min_tokens``,
``min_p``, ``skip_special_tokens`` and ``include_stop_str_in_output``. ``echo`` on completions puts
the prompt before the completion; with ``logprobs`` its tokens are scored too (the first has none),
and ``max_tokens: 0`` answers the prompt alone: lm-eval-harness's loglikelihood request. vLLM's
``prompt_logprobs: k`` (completions and chat) answers the same scores in vLLM's shape instead.

One request fans out into ``Choice`` rows, one engine request each: ``n`` per prompt, and on
completions one prompt per entry of a prompt list, indexed as OpenAI does (prompt ``p``'s
``j``-th choice has index ``p * n + j``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from openlora_ray.engine.constraints import ConstraintSpec
from openlora_ray.engine.prompts import ChatPrompt
from openlora_ray.engine.request import SamplingParams
from openlora_ray.errors import InvalidRequestError
from openlora_ray.serve.openai_responses import ChoiceResult
from openlora_ray.serve.structured import ResponseFormat, StructuredOutputs, checked
from openlora_ray.serve.tool_calls import (
    ArrayParser,
    CallParser,
    HermesParser,
    NamedParser,
    NamedToolChoice,
    Tool,
    ToolCallParser,
    ToolChoice,
    parameters,
    required_calls_schema,
)

MAX_CHOICES = 128  # prompts x n per request; OpenAI's own ceiling on n
MAX_TOP_LOGPROBS = 20  # alternatives per token: OpenAI's ceiling for chat, and the engine's
SEED_BITS = 63


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _false(value: Any) -> bool:
    return value is None or value is False


# Known fields the server does not implement yet -> "is this value a no-op?". Asking for one is
# an error, not a silent no-op; an entry leaves this table when the engine and the response
# formatting implement it.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "functions": _empty,
    "function_call": lambda v: v is None or v == "none",
    "audio": _empty,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _empty,
    "web_search_options": _empty,
    "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "store": _false,
    "suffix": lambda v: v is None or v == "",
    # vLLM extras that benchmark and eval tools send
    "use_beam_search": _false,
}


def unsupported(name: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter",
        "'{param}' is not supported by this server yet (got {value}); leave it out or send its default",
        {"param": name, "value": repr(value)[:80]},
    )


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    """One text part of a message's content (``ChatMessage`` refuses the other types first)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Names the part types a text-only model cannot take (image_url, input_audio, file...)."""
        if isinstance(content, list):
            kinds = sorted({str(p.get("type")) for p in content if isinstance(p, dict)} - {"text"})
            if kinds:
                raise ValueError(
                    f"content part type(s) {', '.join(kinds)} not supported: this model takes 'text' parts only"
                )
        return content

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id'")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role!r} message needs 'content'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry 'tool_calls'")
        return self

    @property
    def text(self) -> str:
        """Text parts are joined with newlines, as vLLM does for string-content chat templates."""
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: string content, ``developer`` as ``system``."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Choice:
    """One engine request of an HTTP request: its OpenAI index, prompt and settings."""

    index: int
    prompt_index: int
    prompt: Any  # str, token ids or a ChatPrompt
    params: SamplingParams


def _given(**fields: Any) -> dict[str, Any]:
    """The fields a request set (not None), so that the engine can tell them from the ones it left out."""
    return {k: v for k, v in fields.items() if v is not None}


def choice_seed(seed: int, j: int) -> int:
    """Choice ``j``'s seed: ``seed`` itself for the first (so ``n=1`` and the first of ``n`` agree),
    then 63 bits of sha256("seed/j"): reproducible, and unrelated to the seeds of nearby requests."""
    if j == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/{j}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: the prompt alone")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM extra; 0 or -1 = no top-k filter")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, max_length=300, description="token id (a JSON string) -> bias")
    min_tokens: int | None = Field(None, ge=0, description="vLLM extra: no end of sequence before this many tokens")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM extra: output valid under this JSON schema")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM extra: its 'json' only")
    response_format: ResponseFormat | None = Field(None, description="OpenAI's on chat; vLLM's on completions too")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extra: drop tokens under min_p x the top's")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="vLLM extra: each prompt token's log probability, k alternatives"
    )
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Known but not implemented: typed loosely so that any value reaches the check below.
    use_beam_search: Any = None

    @model_validator(mode="after")
    def _no_silent_ignoring(self) -> _Common:
        for name, is_noop in UNSUPPORTED.items():
            if name in type(self).model_fields and not is_noop(getattr(self, name)):
                raise unsupported(name, getattr(self, name))
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "invalid_value", "'stream_options' is only allowed when 'stream' is true", {"param": "stream_options"}
            )
        if self.max_tokens == 0 and not self.echoes_prompt:
            raise PydanticCustomError(
                "invalid_value", "'max_tokens' 0 needs 'echo' (the prompt alone)", {"param": "max_tokens"}
            )
        if self.prompt_logprobs is not None and self.stream:  # as vLLM: they come with the whole answer
            raise PydanticCustomError(
                "invalid_value",
                "'prompt_logprobs' are not available when 'stream' is true",
                {"param": "prompt_logprobs"},
            )
        return self

    @property
    def echoes_prompt(self) -> bool:
        return False

    def prompt_scores(self) -> int | None:
        """How many alternatives the engine reports per prompt token; None: the prompt is not scored."""
        return self.prompt_logprobs

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's settings for the first choice (``choices`` derives the others' seeds)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = default_max_tokens if self._max_tokens() is None else self._max_tokens()
        if (self.min_tokens or 0) > max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) is above max_tokens ({max_tokens})")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                # left out when the request leaves them out: the model's generation_config.json
                # defaults apply then (Engine.with_model_defaults), else SamplingParams' own
                **_given(temperature=self.temperature, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                         top_k=None if self.top_k is None else max(0, self.top_k)),
                seed=self.seed,
                stop=stop,
                stop_token_ids=list(self.stop_token_ids or []),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                logit_bias=dict(self.logit_bias or {}),
                min_tokens=self.min_tokens or 0,
                logprobs=self.engine_logprobs(),
                ignore_eos=self.ignore_eos,
                **_given(min_p=self.min_p),
                prompt_logprobs=self.prompt_scores(),
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                constraint=self.output_constraint(),
            )
        except ValidationError as e:
            first = e.errors()[0]
            raise InvalidRequestError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def output_constraint(self) -> ConstraintSpec | None:
        """The JSON schema the output must match (serve/structured.py), checked: a 400 if unusable."""
        given = [
            (where, schema)
            for where, schema in (
                ("guided_json", self.guided_json),
                ("structured_outputs.json", self.structured_outputs.json_ if self.structured_outputs else None),
                *self._constraint_sources(),
            )
            if schema is not None
        ]
        if len(given) > 1:
            raise InvalidRequestError(f"only one output constraint per request; got {', '.join(w for w, _ in given)}")
        return checked(given[0][1], given[0][0]) if given else None

    def _constraint_sources(self) -> list[tuple[str, dict[str, Any] | None]]:
        return [("response_format", self.response_format.target_schema() if self.response_format else None)]

    def engine_logprobs(self) -> int | None:
        """How many alternatives the engine reports per token; None: no log probabilities."""
        raise NotImplementedError

    @property
    def max_tokens_omitted(self) -> bool:
        """Then the engine generates as many tokens as fit the context, up to the default."""
        return self._max_tokens() is None

    def prompts(self) -> list[Any]:
        raise NotImplementedError

    @property
    def candidates_per_prompt(self) -> int:
        """Engine requests per prompt: ``n``, or more where the best ``n`` are picked from them."""
        return self.choices_per_prompt

    def choices(self, default_max_tokens: int) -> list[Choice]:
        params = self.sampling(default_max_tokens)
        k = self.candidates_per_prompt
        out = []
        for p, prompt in enumerate(self.prompts()):
            for j in range(k):
                seeded = (
                    params
                    if params.seed is None or j == 0
                    else params.model_copy(update={"seed": choice_seed(params.seed, j)})
                )
                out.append(Choice(index=p * k + j, prompt_index=p, prompt=prompt, params=seeded))
        return out

    def pick(self, results: list[ChoiceResult]) -> list[ChoiceResult]:
        """The choices to answer with, out of every candidate's result."""
        return results


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="the k most likely tokens per token")
    echo: bool | None = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if len(prompt) == 0 or (
            isinstance(prompt, list) and any(len(p) == 0 for p in prompt if not isinstance(p, int))
        ):
            raise ValueError("the prompt must not be empty")
        return prompt

    @model_validator(mode="after")
    def _sizes(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise PydanticCustomError("invalid_value", "'best_of' must be at least 'n'", {"param": "best_of"})
        if self.picks_best and self.stream:
            raise PydanticCustomError(
                "invalid_value",
                "'best_of' above 'n' cannot be streamed (the best are known at the end)",
                {"param": "best_of"},
            )
        if len(self.prompts()) * self.candidates_per_prompt > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices (prompts x best_of or n) per request")
        return self

    @property
    def picks_best(self) -> bool:
        return (self.best_of or 0) > self.choices_per_prompt

    @property
    def candidates_per_prompt(self) -> int:
        return max(self.best_of or 0, self.choices_per_prompt)

    def engine_logprobs(self) -> int | None:
        """``best_of`` ranks candidates by their tokens' log probabilities, so it needs them."""
        return (self.logprobs or 0) if self.picks_best else self.logprobs

    @property
    def echoes_prompt(self) -> bool:
        return bool(self.echo)

    def prompt_scores(self) -> int | None:
        """Echo's scores (``logprobs`` alternatives) and ``prompt_logprobs``' come from one scoring."""
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(asked) if asked else None

    def pick(self, results: list[ChoiceResult]) -> list[ChoiceResult]:
        """With ``best_of`` above ``n``: per prompt, the ``n`` candidates of the highest mean log
        probability per token (OpenAI's rule), renumbered ``p * n + rank``; their log
        probabilities stay only if the caller asked for them."""
        if not self.picks_best:
            return results
        n, out = self.choices_per_prompt, []
        for p in sorted({r.prompt_index for r in results}):
            ranked = sorted((r for r in results if r.prompt_index == p), key=_mean_logprob, reverse=True)
            for rank, r in enumerate(ranked[:n]):
                kept = r.logprobs if self.logprobs is not None else None
                out.append(dataclasses.replace(r, index=p * n + rank, logprobs=kept))
        return out

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids (a single ``list[int]`` is one prompt)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def prompt_chars(self) -> int:
        return sum(len(p) for p in self.prompts())


def _mean_logprob(r: ChoiceResult) -> float:
    """Of the completion's tokens (an echoed prompt's are marked ``prompt`` by the replica)."""
    entries = [e for e in r.logprobs or () if not e.get("prompt")]
    return sum(e["logprob"] for e in entries) / len(entries) if entries else float("-inf")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Known but not implemented (chat only)
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    store: Any = None

    def _max_tokens(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError(
                "invalid_value", "'top_logprobs' needs 'logprobs': true", {"param": "top_logprobs"}
            )
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise PydanticCustomError("invalid_value", "'tool_choice' needs 'tools'", {"param": "tool_choice"})
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools or ()}:
            raise PydanticCustomError(
                "invalid_value", "'tool_choice' names a function that is not in 'tools'", {"param": "tool_choice"}
            )
        return self

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def effective_tool_choice(self) -> ToolChoice:
        """OpenAI's defaults: ``auto`` with tools, ``none`` without."""
        return self.tool_choice or ("auto" if self.tools else "none")

    def _constraint_sources(self) -> list[tuple[str, dict[str, Any] | None]]:
        """``response_format``'s schema, or the calls that ``required`` or a named function force."""
        choice, tools = self.effective_tool_choice, self.tools or []
        if isinstance(choice, NamedToolChoice):
            forced = parameters(next(t for t in tools if t.function.name == choice.function.name))
        else:
            parallel = self.parallel_tool_calls is not False
            forced = required_calls_schema(tools, parallel) if choice == "required" else None
        return [*super()._constraint_sources(), ("tool_choice", forced)]

    def call_parser(self, family: ToolCallParser) -> CallParser | None:
        """How this request's output becomes ``tool_calls`` (serve/tool_calls.py); None: plain text."""
        choice = self.effective_tool_choice
        if isinstance(choice, NamedToolChoice):
            return NamedParser(choice.function.name)
        if choice == "required":
            return ArrayParser()
        if choice == "auto" and family == "hermes":
            return HermesParser()
        return None

    def chat_prompt(self) -> ChatPrompt:
        offered = self.tools if self.effective_tool_choice != "none" else None
        return ChatPrompt(
            messages=tuple(m.for_template() for m in self.messages),
            tools=tuple(t.model_dump(exclude_none=True) for t in offered) if offered else None,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            template_kwargs=dict(self.chat_template_kwargs or {}),
        )

    def prompts(self) -> list[ChatPrompt]:
        return [self.chat_prompt()]

    def prompt_chars(self) -> int:
        return sum(len(m.text) for m in self.messages)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: ``prompt`` (completion style) or ``messages`` (chat style)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' or 'messages'")
        return self

    def to_prompt(self) -> str | ChatPrompt:
        if self.messages is None:
            return self.prompt or ""
        return ChatPrompt(
            messages=tuple(m.for_template() for m in self.messages),
            tools=tuple(self.tools) if self.tools else None,
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
            template_kwargs=dict(self.chat_template_kwargs or {}),
        )


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
