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
    completion_prompt: str | None = None,
) -> list[str]:
    """The model's greedy answer to each question, asked as a single user message.

    With ``completion_prompt`` (a text with ``{question}``) the question is asked as plain text
    instead, for a base model that completes text but does not follow chat turns; such an answer
    ends at its first line break (the next line is the model inventing the next question).
    """
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end aligned
    stop = {"stop_strings": ["\n"], "tokenizer": tokenizer} if completion_prompt is not None else {}
    try:
        answers = []
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            if completion_prompt is None:
                chats = [[{"role": "user", "content": q}] for q in batch]
                prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
            else:
                prompts = [completion_prompt.format(question=q) for q in batch]
            # a chat template writes its own BOS; a plain prompt gets the tokenizer's
            plain = completion_prompt is not None
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=plain)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, **stop
            )
            new = out[:, enc.input_ids.shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
        return answers
    finally:
        tokenizer.padding_side = side
