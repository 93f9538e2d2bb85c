"""What one decoder-only model family computes differently, as data the one forward reads.

The engine has one forward (``model/llama.py``); a family is a ``FamilySpec`` built from
transformers' own config object (``FamilySpec.from_config``), never a copy of the forward. The
spec names *where* things sit and *which* variant runs; the tensors (weights, RoPE frequencies)
come from the transformers model at load. Sources of each fact are transformers 5.24's modeling
files of the families below (read, not copied):

- norms: ``rms`` (Llama, Mistral, Qwen2/3, Phi-3: ``w * (x / rms(x)).to(dtype)``) or
  ``rms_one_plus`` (Gemma 2/3: ``(x / rms(x) * (1 + w))`` in float32, then cast); Gemma's
  ``sandwich_norms``: the attention output and the MLP output are normed before their residual
  add, and the MLP reads ``pre_feedforward_layernorm`` (Llama's ``post_attention_layernorm`` is the
  MLP's input norm; Gemma's is the attention output's);
- ``qk_norm``: a per-head norm of queries and keys before RoPE (Qwen3, Gemma 3);
- ``attn_scale`` (``query_pre_attn_scalar ** -0.5`` on Gemma, else ``head_dim ** -0.5``),
  ``attn_softcap`` / ``final_softcap`` (Gemma 2: ``cap * tanh(x / cap)`` on attention scores
  before the mask, and on the logits), ``embed_scale`` (Gemma: ``sqrt(hidden)``, cast to the
  model's dtype before it multiplies, as transformers does);
- per-layer sliding windows: a windowed layer's query at position ``p`` reads keys ``p - W <
  j <= p`` (transformers' ``sliding_window_overlay``); Mistral and Phi-3 window every layer,
  Qwen2/3 the layers from ``max_window_layers`` on when ``use_sliding_window``, Gemma 2/3
  alternate local (windowed) and global layers, each kind with its own RoPE (Gemma 3's
  ``rope_local_base_freq`` for local layers);
- RoPE: ``ropes`` lists the distinct rotary settings (a key into ``config.rope_parameters`` for
  per-layer-type configs), ``layer_rope`` which one each layer uses; frequencies and attention
  scaling come from transformers' own init functions (``model/rope.py``);
- ``groups``: the projections fused into one GEMM each (``lora/layers.py``) and the names PEFT
  adapters use for them; Phi-3's checkpoint is already fused (``qkv_proj``, ``gate_up_proj``), so
  its adapters target the fused modules and each of those groups holds one projection;
- ``layer_mlp``: ``dense`` (gate/up/down) or ``moe`` per layer (Qwen3-MoE's sparse layers, every
  layer of Mixtral, whose attention is Mistral's: one window for every layer when
  ``sliding_window`` is set, none when it is null).

MLP hook for other MLP kinds. A decoder layer asks ``mlp_class(kind)`` for its MLP module and
builds it as ``cls(hf_mlp, spec, num_slots, max_rank, transposed=...)``; the module must offer
``groups`` (an ``nn.ModuleDict`` of the ``LoraProjectionGroup``s it owns, by group name, possibly
empty: the model writes adapters into them and builds their row batches) and ``forward(x (B, L, D),
lora: Mapping[str, GroupBatch]) -> (B, L, D)``. ``moe`` resolves to ``model/moe.py``'s ``MoeMlp``.

Exactness range. ``max_positions`` is the number of positions up to which the forward equals
transformers: ``max_position_embeddings``, except ``longrope`` (Phi-3 128k), which transformers
switches from its short to its long factors when the longest position *in the batch* passes
``original_max_position_embeddings``; the engine keeps the short factors, so it is exact up to that
original length and the loader must refuse a longer ``max_seq_len``. ``dynamic`` (NTK) equals the
default RoPE up to ``max_position_embeddings`` and is computed so; past it transformers rescales by
the batch's longest row, which no paged batch can reproduce per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from openlora_ray.errors import OpenLoraError

NormKind = Literal["rms", "rms_one_plus"]
MlpKind = Literal["dense", "moe"]

UNFUSED_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
PHI3_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("qkv_proj",)),
    ("o", ("o_proj",)),
    ("gate_up", ("gate_up_proj",)),
    ("down", ("down_proj",)),
)
ATTENTION_GROUPS = ("qkv", "o")
ROPE_TYPES = frozenset({"default", "linear", "dynamic", "llama3", "yarn", "longrope"})


class UnsupportedFamilyError(OpenLoraError):
    """A config this forward cannot compute exactly (unknown family, or a feature of it we refuse)."""


@dataclass(frozen=True)
class _Traits:
    """What a model type fixes regardless of its config's numbers."""

    norm: NormKind = "rms"
    sandwich_norms: bool = False
    qk_norm: bool = False
    scaled_embeddings: bool = False
    groups: tuple[tuple[str, tuple[str, ...]], ...] = UNFUSED_GROUPS
    activation_key: str = "hidden_act"


_GEMMA = {"norm": "rms_one_plus", "sandwich_norms": True, "scaled_embeddings": True, "activation_key": "hidden_activation"}
TRAITS: dict[str, _Traits] = {
    "llama": _Traits(),
    "mistral": _Traits(),
    "qwen2": _Traits(),
    "qwen3": _Traits(qk_norm=True),
    "qwen3_moe": _Traits(qk_norm=True),
    "mixtral": _Traits(),
    "gemma2": _Traits(**_GEMMA),
    "gemma3_text": _Traits(**_GEMMA, qk_norm=True),
    "phi3": _Traits(groups=PHI3_GROUPS),
}


def adapter_projections(model_type: str) -> tuple[str, ...]:
    """The module names a PEFT adapter of this family may target (torch-free: the store uses it).
    Qwen3-MoE's gate/up/down exist in its dense layers only (Mixtral has none); ``adapter_format``
    refuses them on mixture-of-experts layers (``BaseModelDims.sparse_mlp_layers``)."""
    traits = TRAITS.get(model_type, _Traits())
    return tuple(p for _, projs in traits.groups for p in projs)


@dataclass(frozen=True)
class RopeSpec:
    """One rotary setting: its type, where its parameters sit, and how many dims it rotates."""

    rope_type: str
    layer_type: str | None  # key of config.rope_parameters when the config nests them per layer type
    rotary_dim: int  # head_dim * partial_rotary_factor (Phi-3 may rotate part of each head)


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    norm: NormKind
    norm_eps: float
    sandwich_norms: bool
    qk_norm: bool
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float | None
    activation: str  # a key of transformers' ACT2FN
    sliding_window: int | None  # the window of the windowed layers (one size per model in these families)
    layer_windowed: tuple[bool, ...]
    ropes: tuple[RopeSpec, ...]
    layer_rope: tuple[int, ...]  # index into ropes, per layer
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group, projections) of a dense layer
    layer_mlp: tuple[MlpKind, ...]
    tied_embeddings: bool
    max_positions: int | None

    @property
    def num_layers(self) -> int:
        return len(self.layer_windowed)

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_windowed[layer] else None

    @classmethod
    def from_config(cls, config: Any) -> FamilySpec:
        """The spec of a transformers ``PretrainedConfig`` (duck-typed: no transformers import here)."""
        model_type = config.model_type
        traits = TRAITS.get(model_type)
        if traits is None:
            raise UnsupportedFamilyError(f"model type {model_type!r} has no family spec; known: {sorted(TRAITS)}")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedFamilyError("use_bidirectional_attention (an embedding model) cannot generate text")
        n = config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            windowed = tuple(t == "sliding_attention" and window is not None for t in layer_types)
        else:
            windowed = (window is not None,) * n
        ropes, layer_rope = _ropes(config, layer_types, head_dim)
        pre_attn = getattr(config, "query_pre_attn_scalar", None)
        longrope = [r for r in ropes if r.rope_type == "longrope"]
        max_positions = getattr(config, "max_position_embeddings", None)
        if longrope:
            max_positions = _rope_params(config, longrope[0].layer_type)["original_max_position_embeddings"]
        return cls(
            model_type=model_type,
            norm=traits.norm,
            norm_eps=config.rms_norm_eps,
            sandwich_norms=traits.sandwich_norms,
            qk_norm=traits.qk_norm,
            attn_scale=(pre_attn if pre_attn is not None else head_dim) ** -0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            embed_scale=config.hidden_size**0.5 if traits.scaled_embeddings else None,
            activation=getattr(config, traits.activation_key),
            sliding_window=window if any(windowed) else None,
            layer_windowed=windowed,
            ropes=ropes,
            layer_rope=layer_rope,
            groups=traits.groups,
            layer_mlp=_mlp_kinds(config, n),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=max_positions,
        )


def _rope_params(config: Any, layer_type: str | None) -> dict[str, Any]:
    params = config.rope_parameters
    return params[layer_type] if layer_type is not None else params


def _ropes(config: Any, layer_types: list[str] | None, head_dim: int) -> tuple[tuple[RopeSpec, ...], tuple[int, ...]]:
    """Distinct rotary settings and each layer's; per-layer-type ``rope_parameters`` (Gemma 3)
    are keyed by the layer's type, a flat dict serves every layer."""
    params = config.rope_parameters
    nested = layer_types is not None and all(t in params for t in set(layer_types))
    keys = list(layer_types) if nested else [None] * config.num_hidden_layers
    ropes: list[RopeSpec] = []
    for key in dict.fromkeys(keys):
        p = _rope_params(config, key)
        rope_type = p.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UnsupportedFamilyError(f"RoPE type {rope_type!r} is not supported; supported: {sorted(ROPE_TYPES)}")
        rotary_dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
        ropes.append(RopeSpec(rope_type, key, rotary_dim))
    index = {r.layer_type: i for i, r in enumerate(ropes)}
    return tuple(ropes), tuple(index[k] for k in keys)


def _mlp_kinds(config: Any, num_layers: int) -> tuple[MlpKind, ...]:
    """Qwen3-MoE's sparse layers: every ``decoder_sparse_step``-th layer outside ``mlp_only_layers``;
    Mixtral's: every layer (``MixtralDecoderLayer`` always builds a ``MixtralSparseMoeBlock``)."""
    if config.model_type == "mixtral":
        return ("moe",) * num_layers
    experts = getattr(config, "num_experts", 0) or 0
    if config.model_type != "qwen3_moe" or experts == 0:
        return ("dense",) * num_layers
    step = getattr(config, "decoder_sparse_step", 1)
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    return tuple("moe" if i not in dense_only and (i + 1) % step == 0 else "dense" for i in range(num_layers))
