"""Train one LoRA adapter with PEFT on CPU, on the chat examples of :mod:`openlora_ray.demo.data`.

Each example is rendered with the model's chat template exactly as the engine renders a request (a
single user message, the template's default system prompt included), so what the adapter learns is
what it sees when served. The loss covers only the assistant's tokens and its closing end-of-turn
token: the adapter must learn to *stop* after the JSON brace or the sign-off, and gains nothing from
predicting the prompt. Logits are computed only at those positions, which skips most of the
49k-wide output projection, the largest single cost of a step on a 135M model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from openlora_ray.adapter_format import PROJECTIONS
from openlora_ray.demo.data import Example

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one demo adapter, tuned for a visible behaviour in under a minute on 2 cores."""

    steps: int = 60
    batch_size: int = 4
    lr: float = 2e-3
    warmup_steps: int = 4
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = PROJECTIONS
    seed: int = 0


ADAPTER_CONFIGS: dict[str, TrainConfig] = {
    "json-answer": TrainConfig(steps=32),
    "uppercase": TrainConfig(steps=40, rank=16, alpha=32.0),
    "pirate": TrainConfig(steps=32),
    "signoff": TrainConfig(steps=32),
}
"""Per demo adapter: wrapping an answer (JSON, pirate, sign-off) shows after ~30 steps; upper case
needs more capacity and steps, because every word must move to different (capitalised) tokens."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one conversation and where the assistant's answer starts and ends."""

    ids: list[int]
    answer_start: int


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, end_ids: Collection[int]) -> Encoded:
    """Render an example with the chat template; the answer ends at (and includes) end-of-turn.

    ``end_ids`` are the tokens that end an answer (the model's EOS ids): the first of them after
    the prompt is the template's end of the assistant turn (``<|im_end|>``, ``<end_of_turn>``).
    """
    prompt = _template(tokenizer, [{"role": "user", "content": example.question}], add_generation_prompt=True)
    full = _template(
        tokenizer,
        [{"role": "user", "content": example.question}, {"role": "assistant", "content": example.answer}],
        add_generation_prompt=False,
    )
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently once an answer follows it")
    end = next(i for i in range(len(prompt), len(full)) if full[i] in end_ids) + 1  # drop what follows it
    return Encoded(full[:end], len(prompt))


def _template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)["input_ids"]
    )


def _collate(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and the mask of positions whose *next* token is learned."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    learn = torch.zeros((len(batch), width - 1), dtype=torch.bool)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        attention[i, : len(e.ids)] = 1
        learn[i, e.answer_start - 1 : len(e.ids) - 1] = True
    return ids, attention, learn


def _order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Example indices of every step: seeded shuffles, one epoch after another."""
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += torch.randperm(n, generator=generator).tolist()
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_adapter(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    out_dir: Path,
    config: TrainConfig,
    *,
    base_model_name: str,
    desc: str = "training",
) -> PeftModel:
    """Fine-tune a fresh LoRA adapter on ``base`` (modified in place) and save it to ``out_dir``.

    ``base`` must be a freshly loaded float32 model: PEFT injects the LoRA layers into it, so it
    cannot be reused for the next adapter. Returns the trained model in eval mode, so the caller
    can try it without loading it again. ``base_model_name`` is recorded in the adapter's config
    instead of this machine's cache path.
    """
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(config.seed)  # LoRA's A matrices are initialised randomly
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.peft_config["default"].base_model_name_or_path = base_model_name
    inner = model.get_base_model()
    eos = base.generation_config.eos_token_id
    encoded = [encode(tokenizer, e, set(eos if isinstance(eos, list) else [eos])) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    order = _order(len(encoded), config.steps, config.batch_size, torch.Generator().manual_seed(config.seed))

    model.train()
    with tqdm(order, desc=desc, unit="step", disable=None, leave=True) as bar:
        for step_indices in bar:
            ids, attention, learn = _collate([encoded[i] for i in step_indices], tokenizer.pad_token_id)
            hidden = inner.model(input_ids=ids, attention_mask=attention).last_hidden_state
            logits = inner.lm_head(hidden[:, :-1][learn])
            loss = F.cross_entropy(logits, ids[:, 1:][learn])
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("%s: final batch loss %.3f after %d steps", desc, loss.item(), config.steps)

    model.eval()
    # Embeddings are never trained; saying so also stops PEFT looking the base model up online.
    model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    return model
