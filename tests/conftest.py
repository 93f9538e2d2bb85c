"""Shared fixtures: a tiny random Llama saved as a real Hugging Face folder, and PEFT adapters for it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from peft_helpers import save_peft_adapter

TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def make_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_adapter(name, r, alpha, targets, seed, use_rslora=False) -> folder`` (cached per args)."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def make(name: str, r: int = 4, alpha: float = 8.0, targets: Sequence[str] = ALL_PROJECTIONS, seed: int = 1, use_rslora: bool = False) -> Path:
        key = (name, r, alpha, tuple(targets), seed, use_rslora)
        if key not in made:
            made[key] = save_peft_adapter(tiny_model_dir, root / name, r, alpha, targets, seed, use_rslora)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real demo model (converted once into the user cache; ~20 s the first time)."""
    from openlora_ray.model.prepare import prepare_demo_model

    return prepare_demo_model()


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and vocabulary: text in, (gibberish) text out."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    # SmolLM2's 8,192 positions too: the loader refuses a max_seq_len beyond the model's positions,
    # and the fault tests stream thousands of tokens.
    cfg = dict(
        TINY_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


TINY_QWEN3_MOE = dict(
    TINY_CONFIG,
    num_hidden_layers=4,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    mlp_only_layers=[2],  # layers 0, 1 and 3 are sparse, layer 2 a dense MLP
)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-MoE (8 experts, top 2) saved as a real Hugging Face folder."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY_QWEN3_MOE))
    with torch.no_grad():  # transformers starts routers at zero: every expert would tie
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(params=["kernel", "bmm"])
def lora_op(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Models built inside the test run their one-token LoRA rows on the compiled CPU kernel or on bmm
    (``lora/cpu_kernel.py``), whichever ``choose_kernel`` would have picked on this machine."""
    from openlora_ray.lora import cpu_kernel

    if request.param == "kernel" and cpu_kernel.load() is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    monkeypatch.setenv("OPENLORA_RAY_LORA_KERNEL", request.param)
    cpu_kernel.choose_kernel.cache_clear()
    yield request.param
    cpu_kernel.choose_kernel.cache_clear()
