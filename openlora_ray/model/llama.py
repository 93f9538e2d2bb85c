"""The one forward pass of every supported dense family, with a different LoRA adapter per row.

Weights come from the transformers ``*ForCausalLM`` of the folder (Llama, Mistral, Qwen2/3,
Gemma 2/3, Phi-3, SmolLM); what differs per family is read from a ``FamilySpec``
(``model/family.py``): norm kind and placement, q/k norms, scaling and soft-caps, embedding scale,
activation, per-layer sliding windows and RoPE settings, fused projection names, the MLP kind.
Every decoder layer's projections become ``LoraProjectionGroup``s (qkv, o, gate_up, down). The same
forward serves a prefill chunk of one sequence (L tokens), a decode step of many (L = 1), and a
*mixed* step, decode rows followed by prefill chunks with every token a row of its own
(``PagedBatch.chunks``), against a paged KV cache allocated once (``model/paged_attention.py``);
every row carries its own positions and block table, so rows of different lengths and ages share
one batch and each attends over its own length (its last ``window`` positions in a windowed
layer). Without a cache it is a plain causal forward (tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.lora.cpu_kernel import KernelRows, copier
from openlora_ray.lora.layers import GroupBatch, LoraProjectionGroup
from openlora_ray.lora.ops import NO_ADAPTER, RankBand, Segments, one_band, split_band
from openlora_ray.lora.weights import LoraWeights
from openlora_ray.model.family import FamilySpec, NormKind
from openlora_ray.model.flex_decode import FlexDecodeLayout, flex_decode_attention
from openlora_ray.model.paged_attention import (
    ChunkSpan,
    DecodeLayout,
    PrefillLayout,
    attend,
    decode_attention,
    prefill_attention,
    write_kv,
)
from openlora_ray.model.rope import RotaryTables, apply_rope


@dataclass(frozen=True)
class LoraBatch:
    """Per-group row/slot indices for one forward; a group absent here runs base-only."""

    groups: dict[str, GroupBatch]


class PagedKVCache:
    """Keys and values of ``num_blocks`` blocks of ``block_size`` tokens per layer, allocated once.

    k: (num_layers, num_blocks, KVH, head_dim, block_size), keys transposed within a block, and
    v: (num_layers, num_blocks, KVH, block_size, head_dim); ``model/paged_attention.py`` says why.
    ``token_major`` (CUDA) stores both as (num_layers, num_blocks, block_size, KVH, head_dim), which
    FlexAttention reads as one flat sequence (``model/flex_decode.py``); ``k`` and ``v`` are then
    views of that storage in the shapes above, so every other path reads them unchanged.
    Which block belongs to which sequence is the scheduler's business (``engine/block_pool.py``);
    the cache only stores. Zeroed at allocation: positions past a row's length are masked, and a
    masked weight of exactly 0 times a finite stale value stays 0 (uninitialised memory could hold
    NaN).
    """

    def __init__(
        self,
        dims: BaseModelDims,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        token_major: bool = False,
    ) -> None:
        self.num_blocks, self.block_size, self.token_major = num_blocks, block_size, token_major
        if token_major:
            shape = (dims.num_layers, num_blocks, block_size, dims.num_kv_heads, dims.head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device).permute(0, 1, 3, 4, 2)
            self.v = torch.zeros(shape, dtype=dtype, device=device).permute(0, 1, 3, 2, 4)
            return
        blocks = (dims.num_layers, num_blocks, dims.num_kv_heads)
        self.k = torch.zeros(*blocks, dims.head_dim, block_size, dtype=dtype, device=device)
        self.v = torch.zeros(*blocks, block_size, dims.head_dim, dtype=dtype, device=device)

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
    # prefill: B == 1; decode: L == 1, the first B - sum(chunk lengths) rows (None: there are none)
    layout: PrefillLayout | DecodeLayout | FlexDecodeLayout | None
    # Decode only, for models with windowed layers: the pairs of the rows' last ``window`` positions
    # (``build_decode_layout(..., window=spec.sliding_window)``); prefill windows by masking.
    windowed: DecodeLayout | FlexDecodeLayout | None = None
    chunks: tuple[ChunkSpan, ...] = ()  # a mixed step's prefill chunks, after its decode rows


def make_group(names: tuple[str, ...], owner: nn.Module, num_slots: int, max_rank: int, *, transposed: bool) -> LoraProjectionGroup:
    """Fuse ``owner``'s projections ``names`` into one group; the originals are freed at once, not
    after every layer, so loading never holds the weights twice."""
    linears = [getattr(owner, n) for n in names]
    weights = [m.weight.data for m in linears]
    biases = [m.bias.data if m.bias is not None else None for m in linears]
    fused = LoraProjectionGroup(names, weights, biases, num_slots, max_rank, transposed=transposed)
    for m in linears:
        m.weight, m.bias = None, None
    return fused


class RMSNorm(nn.Module):
    """``rms``: ``w * (x / rms(x)).to(dtype)``; ``rms_one_plus`` (Gemma): ``(x / rms(x) * (1 + w))``
    in float32, cast after. Both normalise in float32, as transformers does; Gemma's ``1 + w`` is
    computed once here (the same float32 sum transformers computes per call)."""

    def __init__(self, hf_norm: nn.Module, eps: float, kind: NormKind) -> None:
        super().__init__()
        weight = hf_norm.weight.data
        self.register_buffer("weight", weight if kind == "rms" else 1.0 + weight.float())
        self.eps, self.kind = eps, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rms":
            return self.weight * h.to(x.dtype)
        return (h * self.weight).to(x.dtype)


class DenseMlp(nn.Module):
    """``down(act(gate) * up)``; Phi-3's checkpoint holds gate and up as one ``gate_up_proj``."""

    def __init__(self, hf_mlp: nn.Module, spec: FamilySpec, num_slots: int, max_rank: int, *, transposed: bool) -> None:
        super().__init__()
        by_name = dict(spec.groups)
        self.groups = nn.ModuleDict(
            {g: make_group(by_name[g], hf_mlp, num_slots, max_rank, transposed=transposed) for g in ("gate_up", "down")}
        )
        self.gate_up, self.down = self.groups["gate_up"], self.groups["down"]
        self.fused = len(by_name["gate_up"]) == 1
        self.act = ACT2FN[spec.activation]

    def forward(self, x: torch.Tensor, lora: Mapping[str, GroupBatch]) -> torch.Tensor:
        out = self.gate_up(x, lora.get("gate_up"))
        gate, up = out[0].chunk(2, dim=-1) if self.fused else out
        return self.down(self.act(gate) * up, lora.get("down"))[0]


def mlp_class(kind: str) -> type[nn.Module]:
    """The MLP module of a layer kind (``model/family.py`` states the interface)."""
    if kind == "moe":
        from openlora_ray.model.moe import MoeMlp

        return MoeMlp
    return DenseMlp


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, spec: FamilySpec, index: int, num_slots: int, max_rank: int, *, transposed: bool) -> None:
        super().__init__()
        attn = hf_layer.self_attn
        cfg = attn.config
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling, self.softcap = spec.attn_scale, spec.attn_softcap
        self.window = spec.window_of(index)
        self.rope = spec.layer_rope[index]

        def norm(hf_norm: nn.Module) -> RMSNorm:
            return RMSNorm(hf_norm, spec.norm_eps, spec.norm)

        self.input_norm = norm(hf_layer.input_layernorm)
        # Llama's post_attention_layernorm is the MLP's input norm; Gemma's norms the attention output.
        sandwich = spec.sandwich_norms
        self.attn_out_norm = norm(hf_layer.post_attention_layernorm) if sandwich else None
        self.mlp_norm = norm(hf_layer.pre_feedforward_layernorm if sandwich else hf_layer.post_attention_layernorm)
        self.mlp_out_norm = norm(hf_layer.post_feedforward_layernorm) if sandwich else None
        self.q_norm = norm(attn.q_norm) if spec.qk_norm else None
        self.k_norm = norm(attn.k_norm) if spec.qk_norm else None
        by_name = dict(spec.groups)
        self.qkv = make_group(by_name["qkv"], attn, num_slots, max_rank, transposed=transposed)
        self.o = make_group(by_name["o"], attn, num_slots, max_rank, transposed=transposed)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_split = (q_width, kv_width, kv_width) if len(by_name["qkv"]) == 1 else None  # Phi-3's fused qkv_proj
        self.mlp = mlp_class(spec.layer_mlp[index])(hf_layer.mlp, spec, num_slots, max_rank, transposed=transposed)

    @property
    def groups(self) -> dict[str, LoraProjectionGroup]:
        """Every LoRA projection group of the layer, by name: the attention's and the MLP's."""
        return {"qkv": self.qkv, "o": self.o, **self.mlp.groups}

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        ropes: Sequence[tuple[torch.Tensor, torch.Tensor]],  # cos, sin per RoPE setting: (B, L, rotary_dim)
        lora: LoraBatch | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None,  # this layer's pools: (NB, KVH, hd, bs), (NB, KVH, bs, hd)
        paged: PagedBatch | None,
        masks: Mapping[int | None, torch.Tensor] | None,  # window -> (B, 1, L, L) bool, True = may attend; no cache
    ) -> torch.Tensor:
        g = lora.groups if lora is not None else {}
        bsz, seq, _ = x.shape
        qkv = self.qkv(self.input_norm(x), g.get("qkv"))
        q, k, v = qkv[0].split(self.qkv_split, dim=-1) if self.qkv_split is not None else qkv
        q = q.view(bsz, seq, self.num_heads, self.head_dim)
        k = k.view(bsz, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, L, hd), (B, KVH, L, hd)
        v = v.view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, *ropes[self.rope])
        if kv is None:
            att = self._full_attention(q, k, v, masks[self.window]).transpose(1, 2)  # (B, L, H, hd)
        else:
            k_pool, v_pool = kv
            new_k = k.transpose(1, 2).reshape(bsz * seq, self.num_kv_heads, self.head_dim)  # (B*L, KVH, hd)
            new_v = v.transpose(1, 2).reshape(bsz * seq, self.num_kv_heads, self.head_dim)
            write_kv(k_pool, v_pool, paged.blocks, paged.offsets, new_k, new_v)
            if isinstance(paged.layout, PrefillLayout):
                att = self._prefill(q[0], k_pool, v_pool, paged.layout).transpose(0, 1)[None]
            else:
                att = self._step_attention(q[:, :, 0], k_pool, v_pool, paged)[:, None]  # (B, 1, H, hd)
        out = self.o(att.reshape(bsz, seq, -1), g.get("o"))[0]
        x = x + (self.attn_out_norm(out) if self.attn_out_norm is not None else out)
        out = self.mlp(self.mlp_norm(x), g)
        return x + (self.mlp_out_norm(out) if self.mlp_out_norm is not None else out)

    def _prefill(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, layout: PrefillLayout
    ) -> torch.Tensor:
        """One sequence's chunk: (H, L, hd) queries -> (H, L, hd)."""
        return prefill_attention(q, k_pool, v_pool, layout, self.scaling, window=self.window, softcap=self.softcap)

    def _step_attention(
        self,
        q: torch.Tensor,  # (B, H, hd): decode rows, then each chunk's tokens
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        paged: PagedBatch,
    ) -> torch.Tensor:  # (B, H, hd)
        """A decode step, or a mixed one: the decode rows through the pairs (or flex) path, each
        prefill chunk as ``prefill_attention`` over its own blocks."""
        num_decode = q.shape[0] - sum(c.length for c in paged.chunks)
        parts = []
        if num_decode:
            layout = paged.layout if self.window is None else paged.windowed
            if layout is None:
                raise ValueError(
                    "a windowed layer needs PagedBatch.windowed for decode (build_decode_layout with window)"
                )
            rows = q[:num_decode]  # (Bd, H, hd)
            if isinstance(layout, FlexDecodeLayout):  # token-major pool, read back in that shape
                k_tm, v_tm = k_pool.permute(0, 3, 1, 2), v_pool.permute(0, 2, 1, 3)  # (NB, bs, KVH, hd)
                parts.append(flex_decode_attention(rows, k_tm, v_tm, layout, self.scaling, self.softcap))
            else:
                parts.append(decode_attention(rows, k_pool, v_pool, layout, self.scaling, self.softcap))
        for c in paged.chunks:
            chunk_q = q[c.row : c.row + c.length].transpose(0, 1)  # (H, L, hd)
            parts.append(self._prefill(chunk_q, k_pool, v_pool, c.layout).transpose(0, 1))  # (L, H, hd)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _full_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention without a cache (tests, reference): (B, H, L, hd)."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        bsz, heads, seq, hd = q.shape
        rep = heads // self.num_kv_heads
        folded = q.reshape(bsz, self.num_kv_heads, rep * seq, hd)  # the rep heads sharing a KV head, as one axis
        out = attend(folded, k, v, mask.repeat(1, 1, rep, 1), self.scaling, self.softcap)
        return out.view(bsz, heads, seq, hd)


class MultiLoraLlama(nn.Module):
    """The base model plus ``num_slots`` LoRA slots of rank up to ``max_rank`` in every layer.

    Named for the layout it began with; it computes every family of ``model/family.py``."""

    def __init__(self, hf_model: nn.Module, num_slots: int, max_rank: int, *, transposed: bool = False) -> None:
        """Takes the HF model's weights over layer by layer: each layer's projections are fused
        and the originals freed before the next layer, so loading never holds the weights twice
        (a full second copy was ~28 GiB at peak for an 8B model in bfloat16)."""
        super().__init__()
        cfg = hf_model.config
        self.config = cfg
        self.spec = spec = FamilySpec.from_config(cfg)
        self.dims = BaseModelDims.from_hf_config(cfg.to_dict())
        self.num_slots, self.max_rank = num_slots, max_rank
        inner = hf_model.model
        self.embed = inner.embed_tokens
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        # Gemma scales embeddings by sqrt(hidden) rounded to the model's dtype, as transformers does.
        scale = torch.tensor(spec.embed_scale).to(dtype=dtype, device=device) if spec.embed_scale is not None else None
        self.register_buffer("embed_scale", scale)
        self.rotary = RotaryTables(cfg, spec.ropes, device)
        self.layers = nn.ModuleList(
            DecoderLayer(layer, spec, i, num_slots, max_rank, transposed=transposed) for i, layer in enumerate(inner.layers)
        )
        self.norm = RMSNorm(inner.norm, spec.norm_eps, spec.norm)
        self.lm_head = hf_model.lm_head
        # Group -> projections, over every layer (an MoE layer has no MLP groups).
        self.group_projs: dict[str, tuple[str, ...]] = {}
        for layer in self.layers:
            self.group_projs.update({name: group.names for name, group in layer.groups.items()})
        self.group_of = {proj: name for name, projs in self.group_projs.items() for proj in projs}
        # Group -> (input width, output width per projection): what one rank row of a slot holds.
        self._group_widths = {
            name: (group.lora_a.shape[-1], group.out_splits)
            for layer in self.layers
            for name, group in layer.groups.items()
        }
        # Groups whose one-token rows the compiled CPU op computes (chosen per shape, so per group name).
        self._kernel_groups = {
            name: group.kernel is not None for layer in self.layers for name, group in layer.groups.items()
        }
        self._copier = copier(self.device)  # slot writes in one compiled call on CPU, else torch copies
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

    def new_kv_cache(self, num_blocks: int, block_size: int, *, token_major: bool = False) -> PagedKVCache:
        return PagedKVCache(self.dims, num_blocks, block_size, self.dtype, self.device, token_major=token_major)

    # ----------------------------------------------------------------- slots
    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter into ``slot``, replacing whatever it held (no clear needed first).
        Asynchronous from pinned host memory (``lora/transfer.py`` runs it on a side stream on CUDA)."""
        dev = self.device
        per_group: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (layer, proj), (a, b_t) in weights.modules.items():
            # ``.to`` releases the GIL even when there is nothing to move, and getting it back can wait a
            # switch interval behind another thread; a CPU write has a few hundred of these calls.
            if a.device != dev:
                a, b_t = a.to(dev, non_blocking=True), b_t.to(dev, non_blocking=True)
            per_group.setdefault((layer, self.group_of[proj]), {})[proj] = (a, b_t)
        previous = (self._slot_rank[slot], self._slot_projs[slot])
        copies = [
            pair
            for i, layer in enumerate(self.layers)
            for name, group in layer.groups.items()
            for pair in group.slot_copies(slot, per_group.get((i, name), {}), weights.rank, previous)
        ]
        if self._copier is not None:
            self._copier.copy(copies)
        else:
            for dst, src in copies:
                if src is None:
                    dst.zero_()
                else:
                    dst.copy_(src)
        self._slot_rank[slot] = weights.rank
        self._slot_projs[slot] = weights.projections

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers:
            for group in layer.groups.values():
                group.clear_slot(slot)
        self._slot_rank[slot] = 0
        self._slot_projs[slot] = frozenset()

    def lora_batch(
        self, slots: Sequence[int], runs: Sequence[range] = (), *, one_token: bool = False
    ) -> LoraBatch | None:
        """Per-group indices for rows using ``slots`` (``NO_ADAPTER`` = base only). Built once per forward.

        ``runs``: ranges of rows that hold one prefill chunk's tokens (a mixed step), one slot per
        run. Each run is one group of its own, read in place: segmented with the decode rows, a
        40-token chunk would become 14 groups of 3 rows, each gathering a copy of its slot.
        ``one_token``: every row holds one token (a decode or mixed step): the rows outside runs then go
        to a group's CPU kernel where it has one; runs stay on bmm, which is faster for tall products.
        """
        groups: dict[str, GroupBatch] = {}
        # Groups with the same rows share their segments; with the same bytes per rank row too, their bands.
        wholes: dict[tuple[int, ...], RankBand] = {}
        bands: dict[tuple[tuple[int, ...], int], tuple[RankBand, ...]] = {}
        plans: dict[tuple[int, ...], KernelRows] = {}
        chunked = {i for r in runs for i in r}
        run_bands = {r.start: self._run_band(r, slots[r.start]) for r in runs if slots[r.start] != NO_ADAPTER}
        for name, projs in self.group_projs.items():
            rows = [
                i for i, s in enumerate(slots)
                if i not in chunked and s != NO_ADAPTER and not self._slot_projs[s].isdisjoint(projs)
            ]
            own = [start for start in run_bands if not self._slot_projs[slots[start]].isdisjoint(projs)]
            if not rows and not own:
                continue
            adapted = frozenset().union(*(self._slot_projs[slots[i]] for i in rows + own))
            active = tuple(j for j, p in enumerate(projs) if p in adapted)
            decode: tuple[RankBand, ...] = ()
            plan = None
            if rows and one_token and self._kernel_groups[name]:
                if (row_key := tuple(rows)) not in plans:
                    plans[row_key] = KernelRows.build(rows, [slots[i] for i in rows], self._slot_rank)
                plan = plans[row_key]
            elif rows:
                used = [slots[i] for i in rows]
                if (row_key := tuple(rows)) not in wholes:
                    wholes[row_key] = one_band(rows, used, self._slot_rank, len(slots), self.device)
                if (key := (row_key, self._rank_row_bytes(name, active))) not in bands:
                    bands[key] = split_band(
                        wholes[row_key], rows, used, self._slot_rank, len(slots), self.device, rank_row_bytes=key[1]
                    )
                decode = bands[key]
            groups[name] = GroupBatch(decode + tuple(run_bands[start] for start in own), active, plan)
        return LoraBatch(groups) if groups else None

    def _run_band(self, run: range, slot: int) -> RankBand:
        """The rows of one prefill chunk as one group on its slot, read in place."""
        rows = torch.arange(run.start, run.stop, device=self.device)
        seg = Segments(order=rows, keep=None, slots=slice(slot, slot + 1), groups=1, size=len(run))
        return RankBand(rows, seg, self._slot_rank[slot])

    def _rank_row_bytes(self, group: str, active: tuple[int, ...]) -> int:
        """Bytes of one rank row of one slot in one layer, over the ``active`` projections of ``group``."""
        width_in, outs = self._group_widths[group]
        return self.dtype.itemsize * sum(width_in + outs[j] for j in active)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,  # (B, L) long
        positions: torch.Tensor,  # (B, L) long, position of each token in its sequence
        lora: LoraBatch | None = None,
        cache: PagedKVCache | None = None,
        paged: PagedBatch | None = None,  # required with a cache
        logits_at: torch.Tensor | None = None,  # (B,) long, one position index per row; None = all
        logit_rows: torch.Tensor | None = None,  # (N,) long, with L == 1: only these rows' logits
    ) -> torch.Tensor:  # (B, L, V), or (B, V) with logits_at, or (N, V) with logit_rows
        x = F.embedding(tokens, self.embed.weight)  # (B, L, D)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        ropes = self.rotary(positions, x.dtype)
        masks = None
        if cache is None:
            masks = {None: positions[:, None, None, :] <= positions[:, None, :, None]}  # (B, 1, L, L)
            window = self.spec.sliding_window
            if window is not None:
                masks[window] = masks[None] & (positions[:, None, None, :] > positions[:, None, :, None] - window)
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x = layer(x, ropes, lora, kv, paged, masks)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at]  # (B, D)
        elif logit_rows is not None:
            x = x[:, 0].index_select(0, logit_rows)  # (N, D)
        logits = self.lm_head(self.norm(x))
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
