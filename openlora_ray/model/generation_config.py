"""What a model folder's ``generation_config.json`` says about ending and sampling answers.

Instruct models often end a turn with a token that ``config.json`` does not call EOS: Llama 3
Instruct's ``config.json`` names ``<|end_of_text|>`` (128001) while its ``generation_config.json``
lists ``[128001, 128008, 128009]``, ``<|eot_id|>`` among them. Ignoring the file makes every
answer run to ``max_tokens``. Its sampling fields are the model authors' recommended defaults
(Qwen3: temperature 0.6, top_p 0.95, top_k 20); like vLLM (``generation_config="auto"``), they
apply to requests that do not set those fields themselves. ``do_sample`` is not read, as vLLM
does not: a request without a temperature samples with the recommended one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openlora_ray.model.support import UnsupportedModelError

FILE = "generation_config.json"
# generation_config.json field -> the engine's SamplingParams field of the same meaning
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty"}


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: frozenset[int] = frozenset()
    sampling: dict[str, float | int] = field(default_factory=dict)  # SamplingParams field -> value, only those set


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def read_generation_defaults(path: str | Path) -> GenerationDefaults:
    """EOS ids from ``config.json`` and ``generation_config.json`` together, and the latter's
    sampling defaults; a folder without the file gets ``config.json``'s EOS and no defaults."""
    path = Path(path)
    eos: set[int] = set()
    config = path / "config.json"
    if config.is_file():
        eos |= _ids(json.loads(config.read_text()).get("eos_token_id"))
    file = path / FILE
    if not file.is_file():
        return GenerationDefaults(frozenset(eos))
    try:
        gen = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{file} is not valid JSON: {e}; fix or remove it") from e
    eos |= _ids(gen.get("eos_token_id"))
    sampling = {ours: gen[theirs] for theirs, ours in SAMPLING_FIELDS.items() if gen.get(theirs) is not None}
    return GenerationDefaults(frozenset(eos), sampling)
