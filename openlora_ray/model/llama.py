"""A compact forward pass for Llama-family models with a different LoRA adapter per row.

The weights come from a Hugging Face ``LlamaForCausalLM`` (also Mistral, Qwen2 and SmolLM, which
share its layout); norms, rotary embeddings and activation are reused from transformers, and the
seven projections of every decoder layer become four ``LoraProjectionGroup``s (qkv, o, gate_up,
down). The same forward serves a prefill chunk of one sequence (L tokens) and a decode step of
many (L = 1) against a paged KV cache allocated once (``model/paged_attention.py``); every row
carries its own positions and block table, so rows of different lengths and ages share one batch
and each attends over its own length. Without a cache it is a plain causal forward (tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.lora.layers import GroupBatch, LoraProjectionGroup
from openlora_ray.lora.ops import NO_ADAPTER, Segments, segment_rows
from openlora_ray.lora.weights import LoraWeights
from openlora_ray.model.paged_attention import (
    DecodeLayout,
    PrefillLayout,
    decode_attention,
    prefill_attention,
    write_kv,
)

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF = {proj: group for group, projs in GROUPS.items() for proj in projs}


@dataclass(frozen=True)
class LoraBatch:
    """Per-group row/slot indices for one forward; a group absent here runs base-only."""

    groups: dict[str, GroupBatch]


class PagedKVCache:
    """Keys and values of ``num_blocks`` blocks of ``block_size`` tokens per layer, allocated once.

    k: (num_layers, num_blocks, KVH, head_dim, block_size), keys transposed within a block, and
    v: (num_layers, num_blocks, KVH, block_size, head_dim); ``model/paged_attention.py`` says why.
    Which block belongs to which sequence is the scheduler's business (``engine/block_pool.py``);
    the cache only stores. Zeroed at allocation: positions past a row's length are masked, and a
    masked weight of exactly 0 times a finite stale value stays 0 (uninitialised memory could hold
    NaN).
    """

    def __init__(self, dims: BaseModelDims, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        blocks = (dims.num_layers, num_blocks, dims.num_kv_heads)
        self.k = torch.zeros(*blocks, dims.head_dim, block_size, dtype=dtype, device=device)
        self.v = torch.zeros(*blocks, block_size, dims.head_dim, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(dims: BaseModelDims, block_size: int, dtype: torch.dtype) -> int:
        return 2 * dims.num_layers * dims.num_kv_heads * block_size * dims.head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class PagedBatch:
    """Where a forward's new keys and values go and how its queries read the cache."""

    blocks: torch.Tensor  # (B*L,) long, the block each new token's key and value go to
    offsets: torch.Tensor  # (B*L,) long, their position within it
    layout: PrefillLayout | DecodeLayout  # prefill: B == 1; decode: L == 1


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, act: nn.Module, num_slots: int, max_rank: int, *, transposed: bool) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_norm = hf_layer.input_layernorm
        self.post_norm = hf_layer.post_attention_layernorm
        self.num_heads = attn.config.num_attention_heads
        self.num_kv_heads = attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.act = act

        def group(names: tuple[str, ...], owner: nn.Module) -> LoraProjectionGroup:
            linears = [getattr(owner, n) for n in names]
            weights = [m.weight.data for m in linears]
            biases = [m.bias.data if m.bias is not None else None for m in linears]
            fused = LoraProjectionGroup(names, weights, biases, num_slots, max_rank, transposed=transposed)
            for m in linears:  # the fused copy replaces them: free them now, not after every layer
                m.weight, m.bias = None, None
            return fused

        owners = {"qkv": attn, "o": attn, "gate_up": mlp, "down": mlp}
        self.groups = nn.ModuleDict({name: group(GROUPS[name], owner) for name, owner in owners.items()})

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, L, head_dim)
        lora: LoraBatch | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None,  # this layer's pools: (NB, KVH, hd, bs), (NB, KVH, bs, hd)
        paged: PagedBatch | None,
        mask: torch.Tensor | None,  # (B, 1, L, L) bool, True = may attend; only without a cache
    ) -> torch.Tensor:
        g = lora.groups if lora is not None else {}
        bsz, seq, _ = x.shape
        q, k, v = self.groups["qkv"](self.input_norm(x), g.get("qkv"))
        q = q.view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, L, hd)
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        if kv is None:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            att = att.transpose(1, 2)  # (B, L, H, hd)
        else:
            k_pool, v_pool = kv
            new_k = k.transpose(1, 2).reshape(bsz * seq, self.num_kv_heads, self.head_dim)  # (B*L, KVH, hd)
            new_v = v.transpose(1, 2).reshape(bsz * seq, self.num_kv_heads, self.head_dim)
            write_kv(k_pool, v_pool, paged.blocks, paged.offsets, new_k, new_v)
            if isinstance(paged.layout, PrefillLayout):
                att = prefill_attention(q[0], k_pool, v_pool, paged.layout, self.scaling).transpose(0, 1)[None]
            else:
                att = decode_attention(q[:, :, 0], k_pool, v_pool, paged.layout, self.scaling)[:, None]
        x = x + self.groups["o"](att.reshape(bsz, seq, -1), g.get("o"))[0]
        gate, up = self.groups["gate_up"](self.post_norm(x), g.get("gate_up"))
        return x + self.groups["down"](self.act(gate) * up, g.get("down"))[0]


class MultiLoraLlama(nn.Module):
    """The base model plus ``num_slots`` LoRA slots of rank up to ``max_rank`` in every layer."""

    def __init__(self, hf_model: nn.Module, num_slots: int, max_rank: int, *, transposed: bool = False) -> None:
        """Takes the HF model's weights over layer by layer: each layer's projections are fused
        and the originals freed before the next layer, so loading never holds the weights twice
        (a full second copy was ~28 GiB at peak for an 8B model in bfloat16)."""
        super().__init__()
        cfg = hf_model.config
        self.config = cfg
        self.dims = BaseModelDims.from_hf_config(cfg.to_dict())
        self.num_slots, self.max_rank = num_slots, max_rank
        inner = hf_model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        act = ACT2FN[cfg.hidden_act]
        self.layers = nn.ModuleList(DecoderLayer(layer, act, num_slots, max_rank, transposed=transposed) for layer in inner.layers)
        self.norm = inner.norm
        self.lm_head = hf_model.lm_head
        # What each slot holds, for building per-group batches without touching the buffers.
        self._slot_rank = [0] * num_slots
        self._slot_projs: list[frozenset[str]] = [frozenset()] * num_slots

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def bytes_per_slot(self) -> int:
        return sum(g.bytes_per_slot() for layer in self.layers for g in layer.groups.values())

    def new_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(self.dims, num_blocks, block_size, self.dtype, self.device)

    # ----------------------------------------------------------------- slots
    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter into ``slot``, replacing whatever it held (no clear needed first)."""
        dev = self.device
        per_group: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (layer, proj), (a, b_t) in weights.modules.items():
            per_group.setdefault((layer, GROUP_OF[proj]), {})[proj] = (a.to(dev), b_t.to(dev))
        previous = (self._slot_rank[slot], self._slot_projs[slot])
        for i, layer in enumerate(self.layers):
            for name, group in layer.groups.items():
                group.write_slot(slot, per_group.get((i, name), {}), weights.rank, previous)
        self._slot_rank[slot] = weights.rank
        self._slot_projs[slot] = weights.projections

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers:
            for group in layer.groups.values():
                group.clear_slot(slot)
        self._slot_rank[slot] = 0
        self._slot_projs[slot] = frozenset()

    def lora_batch(self, slots: Sequence[int]) -> LoraBatch | None:
        """Per-group indices for rows using ``slots`` (``NO_ADAPTER`` = base only). Built once per forward."""
        groups: dict[str, GroupBatch] = {}
        indices: dict[tuple[int, ...], tuple[torch.Tensor | None, Segments]] = {}  # shared by groups with the same rows
        for name, projs in GROUPS.items():
            rows = [i for i, s in enumerate(slots) if s != NO_ADAPTER and not self._slot_projs[s].isdisjoint(projs)]
            if not rows:
                continue
            rank = max(self._slot_rank[slots[i]] for i in rows)
            adapted = frozenset().union(*(self._slot_projs[slots[i]] for i in rows))
            active = tuple(j for j, p in enumerate(projs) if p in adapted)
            key = tuple(rows)
            if key not in indices:
                row_t = None if len(rows) == len(slots) else torch.tensor(rows, device=self.device)
                indices[key] = (row_t, segment_rows(rows, [slots[i] for i in rows], len(slots), self.device))
            groups[name] = GroupBatch(*indices[key], rank, active)
        return LoraBatch(groups) if groups else None

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,  # (B, L) long
        positions: torch.Tensor,  # (B, L) long, position of each token in its sequence
        lora: LoraBatch | None = None,
        cache: PagedKVCache | None = None,
        paged: PagedBatch | None = None,  # required with a cache
        logits_at: torch.Tensor | None = None,  # (B,) long, one position index per row; None = all
    ) -> torch.Tensor:  # (B, L, V), or (B, V) with logits_at
        x = self.embed(tokens)  # (B, L, D)
        rope = self.rotary(x, positions)
        mask = None if cache is not None else positions[:, None, None, :] <= positions[:, None, :, None]  # (B, 1, L, L)
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x = layer(x, rope, lora, kv, paged, mask)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]  # (B, D)
        return self.lm_head(self.norm(x))
