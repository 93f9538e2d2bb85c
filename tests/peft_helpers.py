"""Building real PEFT adapters for tests (LoRA B made non-zero: PEFT's init would be a no-op)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def save_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    r: int,
    alpha: float,
    targets: Sequence[str],
    seed: int,
    use_rslora: bool = False,
) -> Path:
    """A real PEFT LoRA adapter with non-zero B (PEFT's init makes B zero: a no-op adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def train_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    r: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    max_steps: int = 300,
) -> Path:
    """A real PEFT LoRA adapter (all projections) *trained* until greedy decoding of each
    ``(prompt ids, answer ids)`` example writes exactly the answer, every answer token ahead of the
    runner-up by 0.2 in log probability (float differences between engines are ~1e-5, so no token
    can flip). For tests that need a model to write something specific, a tool call, that a tiny
    random model never would. A tiny random model's tied embeddings and final norm cap its logits
    near +-1.3, so the plain log-likelihood barely moves and gives ranks little push: the loss is
    cross-entropy on logits sharpened 10x, which drives the ranking the test needs (~80 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's matmuls: more threads only contend (2 loaded cores: 6x slower)
    try:
        return _train(base_dir, out_dir, examples, r=r, alpha=alpha, seed=seed, max_steps=max_steps)
    finally:
        torch.set_num_threads(threads)


def _train(
    base_dir: Path,
    out_dir: Path,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    r: int,
    alpha: float,
    seed: int,
    max_steps: int,
) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    rows = [(torch.tensor([*p, *a]), torch.tensor(list(a))) for p, a in examples]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(max_steps):
        loss, learnt = torch.zeros(()), True
        for ids, answer in rows:
            logits = model(ids[None, :-1], logits_to_keep=len(answer)).logits[0]  # (answer tokens, V)
            logp = logits.detach().log_softmax(-1)
            chosen = logp.gather(1, answer[:, None])[:, 0]
            rival = logp.scatter(1, answer[:, None], float("-inf")).amax(-1)
            learnt = learnt and bool((chosen - rival > 0.2).all())
            loss = loss + torch.nn.functional.cross_entropy(logits * 10.0, answer)
        if learnt:
            model.save_pretrained(out_dir, safe_serialization=True)
            return out_dir
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError(f"the adapter did not learn its examples in {max_steps} steps")
