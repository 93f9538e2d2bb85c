"""Batched greedy chat answers from a Hugging Face (or PEFT) model, for the demo's own use.

The demo needs answers twice outside the serving engine: the base model's answers are the content
of the training data, and one answer of each freshly trained adapter is shown to the user. Both
run in the training process on a model already in memory, so plain ``generate`` is the simplest
tool; serving goes through :mod:`openlora_ray.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[str]:
    """The model's greedy answer to each question, asked as a single user message."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end aligned
    try:
        answers = []
        for start in range(0, len(questions), batch_size):
            prompts = [
                tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                for q in questions[start : start + batch_size]
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new = out[:, enc.input_ids.shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
        return answers
    finally:
        tokenizer.padding_side = side
