"""The sparse MLP of mixture-of-experts layers (Qwen3-MoE, Mixtral), computed as transformers does.

Router: ``softmax`` over the experts in float32 of ``x @ W_gate^T``, the ``top_k`` largest kept,
renormalised to sum 1 when ``norm_topk_prob`` (Qwen3-MoE's config flag; Mixtral always does), then
cast to the activations' dtype (Qwen3-MoE; Mixtral's stay float32 and the product is cast, which
is the same in float32 and within rounding in bfloat16). Experts: ``down_e(act(gate_e(x)) * up_e(x))``
with transformers 5's stacked weights, ``gate_up_proj (E, 2I, D)`` (gate rows first) and
``down_proj (E, D, I)``; each token's output is the routing-weighted sum of its ``top_k`` experts'.
(Read from transformers 5.24's ``Qwen3MoeTopKRouter``/``Qwen3MoeExperts`` and Mixtral's; not copied.)

Dispatch. transformers loops over every expert hit with a boolean mask search per expert. Here
the ``T * top_k`` (token, expert) pairs are sorted by expert once, the tokens gathered into that
order, and each expert multiplies one contiguous slice of rows; one ``index_add_`` scatters the
weighted rows back. Rows reach ``index_add_`` in ascending expert order per token, the order
transformers adds them in, so float32 results agree to rounding. One host sync per layer (the
per-expert counts, to slice on the host). Shapes, T = B * L tokens, k = top_k, E experts:

    x (B, L, D) -> tokens (T, D) -> router logits (T, E) -> top-k weights, experts (T, k)
    pairs sorted by expert: order (T*k,), token_of (T*k,), rows (T*k, D) = tokens[token_of]
    expert e: rows[s_e:s_e+n_e] (n_e, D) -> gate_up (n_e, 2I) -> act(gate) * up (n_e, I) -> (n_e, D)
    weighted (T*k, D) -> index_add_ by token_of -> (T, D) -> (B, L, D)

What LoRA adapts. Nothing inside this module: ``groups`` is empty, so the engine's adapters
change the attention projections of every layer and the dense MLP layers (``mlp_only_layers``,
layers off the ``decoder_sparse_step``), while the router and the experts always run the base
weights. Adapters that target expert or router weights (per-expert LoRA) are refused when they
are pushed and when they are loaded (``adapter_format.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from openlora_ray.lora.layers import GroupBatch


class MoeMlp(nn.Module):
    """A sparse MLP layer; the constructor signature is ``model/family.py``'s MLP hook."""

    def __init__(self, hf_mlp: nn.Module, spec: Any, num_slots: int, max_rank: int, *, transposed: bool) -> None:
        """Takes over (references, never copies) the router and expert weights of a transformers
        ``*SparseMoeBlock``. ``num_slots``, ``max_rank`` and ``transposed`` belong to the hook's
        signature and are unused: nothing here holds LoRA slots, and the expert GEMMs read the
        stored ``(out, in)`` layout (one GEMM per expert slice, where the layout choice of
        ``model/layout.py`` for decode-sized fused groups does not carry over)."""
        super().__init__()
        del num_slots, max_rank, transposed
        gate, experts = hf_mlp.gate, hf_mlp.experts
        self.register_buffer("router", gate.weight.data)  # (E, D)
        self.register_buffer("gate_up", experts.gate_up_proj.data)  # (E, 2I, D)
        self.register_buffer("down", experts.down_proj.data)  # (E, D, I)
        self.top_k = gate.top_k
        self.num_experts = self.router.shape[0]
        # Qwen3-MoE reads the flag from its config; Mixtral's router always renormalises.
        self.norm_topk_prob = bool(getattr(gate, "norm_topk_prob", True))
        self.act = ACT2FN[spec.activation] if spec is not None else experts.act_fn
        self.groups = nn.ModuleDict()  # no LoRA on the router or the experts (see the module docstring)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights (T, k) in the tokens' dtype and expert indices (T, k) long."""
        probs = torch.softmax(F.linear(tokens, self.router), dim=-1, dtype=torch.float32)  # (T, E)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (T, k), (T, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(tokens.dtype), experts

    def forward(self, x: torch.Tensor, lora: Mapping[str, GroupBatch] | None = None) -> torch.Tensor:
        del lora  # nothing in this module is adapted
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, D)
        weights, experts = self.route(tokens)
        flat = experts.reshape(-1)  # (T*k,), pair p = token p // k, its (p % k)-th choice
        order = torch.argsort(flat, stable=True)  # pairs by expert; a token's pairs keep their rank order
        token_of = order // self.top_k  # (T*k,)
        rows = tokens[token_of]  # (T*k, D)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        out = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            gate, up = F.linear(rows[start : start + n], self.gate_up[e]).chunk(2, dim=-1)  # (n, I) each
            out[start : start + n] = F.linear(self.act(gate) * up, self.down[e])  # (n, D)
            start += n
        out *= weights.reshape(-1)[order, None]  # (T*k, D)
        return torch.zeros_like(tokens).index_add_(0, token_of, out).reshape(shape)
