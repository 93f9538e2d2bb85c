"""Log probabilities of a prompt's own tokens (vLLM's ``prompt_logprobs``; what OpenAI's ``echo``
with ``logprobs`` and lm-eval-harness's loglikelihood requests read).

They are the model's raw distribution, ``log_softmax`` of the logits at the position before each
token, with no penalty, bias or temperature (nothing was sampled there), as vLLM reports them.

Where they are computed, and why that way: the engine's prefill chunks ask the model for every
position's logits (``ModelRunner.prefill(all_logits=True)``) instead of only the last one's. A
token whose keys and values came from the prefix cache has no logits, so a sequence that still
needs prompt log probabilities takes no prefix-cache hits (``Seq.needs_prompt_logits``; vLLM's
scheduler makes the same choice) and computes its whole prompt; its blocks still enter the cache
for others. Once its prompt is scored the flag drops, so a preempted sequence recomputes with hits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openlora_ray.engine.request import TokenLogprobs


def score_tokens(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprobs]:
    """``targets[i]``'s log probability under ``logits[i]`` (T, V) and its rank there (1 + the
    tokens more likely: vLLM's ``Logprob.rank``), with the ``k`` most likely tokens at each
    position; one copy to the host."""
    logp = logits.float().log_softmax(-1)  # (T, V)
    ids = torch.tensor(list(targets), device=logits.device)[:, None]
    chosen = logp.gather(1, ids)  # (T, 1)
    parts = [chosen.double(), (logp > chosen).sum(-1, keepdim=True).double() + 1]
    if k:
        top = logp.topk(k, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    rows = torch.cat(parts, dim=1).tolist()
    return [
        TokenLogprobs(r[0], tuple((int(t), v) for t, v in zip(r[2 : 2 + k], r[2 + k :])), rank=int(r[1]))
        for r in rows
    ]
