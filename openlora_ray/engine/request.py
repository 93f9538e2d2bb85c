"""What a caller hands the engine, and what it streams back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from openlora_ray.engine.constraints import ConstraintSpec


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log probability and the most likely alternatives (see engine/sampling.py)."""

    token_logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log probability), most likely first
    rank: int | None = None  # the token's rank in its distribution (1 = most likely): prompt tokens only

FinishReason = Literal["stop", "length", "abort", "error"]
# A stop string longer than this is refused (400): held-back text and matching state grow with it,
# and no real stop sequence (an end-of-turn marker, a closing tag) comes near it.
MAX_STOP_CHARS = 256
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class SamplingParams(BaseModel):
    """Per-request decoding settings (OpenAI's names). ``temperature == 0`` means greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=0, description="0: no output, only the prompt (for prompt_logprobs)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filter")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="int64, as torch's generators take")
    stop: list[StopString] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(default_factory=dict, max_length=300)
    min_tokens: int = Field(0, ge=0)
    constraint: ConstraintSpec | None = Field(None, description="output that must match a JSON schema")
    logprobs: int | None = Field(None, ge=0, le=20, description="None = none; k = the sampled token's and the k most likely")
    ignore_eos: bool = False
    # vLLM's extras: the min_p filter (drop tokens below min_p x the top token's probability),
    # log probabilities of the prompt's own tokens, and how the output text is made.
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="None = none; k as in logprobs")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenised request. ``adapter_id`` None means the base model."""

    request_id: str
    adapter_id: str | None
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class StreamOutput:
    """One streamed increment. The last one of a request has ``finish_reason`` set.

    ``text`` is the new text since the previous increment (held back while it could still turn
    out to be the start of a stop string); ``token_ids`` the tokens it came from.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float | None = None
    mean_token_latency_s: float | None = None
    error: Exception | None = None  # set when finish_reason == "error"
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token in ``token_ids`` when the request asked
    # With ``prompt_logprobs``, on the first increment: one per prompt token (None for the first).
    prompt_logprobs: tuple[TokenLogprobs | None, ...] = ()
