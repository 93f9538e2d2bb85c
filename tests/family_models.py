"""Tiny random models of every supported family, built from transformers' own config classes.

Windows are shorter than the test sequences so that they matter, soft-caps are small enough to
bend the scores, norms are perturbed (Gemma's start at zero, i.e. ``1 + w = 1``), routers are
scaled up so that tokens pick their experts decisively (no near-ties for rounding to flip), and
the RoPE variants use non-trivial parameters. Each model is saved once per session as a real folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 0,  # within the tiny vocabulary (Phi-3's default is not)
    "eos_token_id": None,  # generate() would stop at an eos the engine is told to ignore
}
WINDOW = 6  # shorter than every test sequence past its prompt
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW, "hidden_activation": "gelu_pytorch_tanh"}
HALF_ROTARY = 4  # Phi-3 with partial_rotary_factor 0.5 rotates 8 of 16 dims: 4 frequencies

# family -> ("<config class prefix>[:<model class prefix>]", config kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen2": ("Qwen2", dict(COMMON)),
    "qwen2-window": ("Qwen2", dict(COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3", dict(COMMON, head_dim=16, tie_word_embeddings=True)),
    "mistral": ("Mistral", dict(COMMON, sliding_window=WINDOW)),
    "gemma2": ("Gemma2", dict(COMMON, **GEMMA, attn_logit_softcapping=3.0, final_logit_softcapping=4.0, tie_word_embeddings=True)),
    "gemma3": (
        "Gemma3Text:Gemma3",
        dict(
            COMMON, **GEMMA, rope_local_base_freq=100.0, tie_word_embeddings=True,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "phi3": ("Phi3", dict(COMMON, sliding_window=WINDOW)),
    "phi3-longrope-partial": (
        "Phi3",
        dict(
            COMMON, partial_rotary_factor=0.5, original_max_position_embeddings=64,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 8.0]},
        ),
    ),
    "mixtral": ("Mixtral", dict(COMMON, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "llama-llama3": ("Llama", dict(COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama-yarn": ("Llama", dict(COMMON, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear": ("Llama", dict(COMMON, rope_scaling={"rope_type": "linear", "factor": 3.0})),
    "llama-dynamic": ("Llama", dict(COMMON, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}
FUSED = ("phi3", "phi3-longrope-partial")
MOE = ("mixtral",)  # every layer sparse: adapters may target the attention projections only


def adapter_targets(family: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Two different target sets: every projection, and a few."""
    if family in MOE:
        return ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj")
    if family in FUSED:
        return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("qkv_proj", "down_proj")
    return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), ("q_proj", "v_proj", "down_proj")


def build(family: str, path: Path) -> Path:
    import transformers

    prefix, kwargs = FAMILIES[family]
    config_prefix, _, model_prefix = prefix.partition(":")
    config = getattr(transformers, f"{config_prefix}Config")(**kwargs)
    torch.manual_seed(sum(map(ord, family)))
    model = getattr(transformers, f"{model_prefix or config_prefix}ForCausalLM")(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "mlp.gate.weight" in name:  # a router
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_hf(path: Path) -> torch.nn.Module:
    """The reference: transformers' eager attention (the path that applies soft-capping), float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(model: torch.nn.Module, seq: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(seq)])).logits[0]


def word_ids(text: str) -> list[int]:
    """The token ids a text of ``save_word_tokenizer``'s words names (and nothing else)."""
    assert re.fullmatch(r"(\s*t\d{3})*\s*", text), text
    return [int(i) for i in re.findall(r"t(\d{3})", text)]


def save_word_tokenizer(path: Path, vocab_size: int = 256) -> Path:
    """A real tokenizer for the tiny models' vocabulary: token ``i`` is the word ``t<iii>``, words
    split on whitespace, no special tokens. Every id decodes to its own word (a byte-level tokenizer
    of 256 ids would merge bytes into replacement characters), so an answer's text names its token
    ids (``word_ids``), also where transformers loads the folder with its family's own tokenizer
    class (a ``qwen2`` folder gets ``Qwen2Tokenizer``, whose byte-level decoder drops the spaces:
    the words are of one width for that)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i:03d}": i for i in range(vocab_size)}, unk_token="t000"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path
