"""Rotary position tables for each of a model's RoPE settings, from transformers' own init functions.

Frequencies and the attention scaling (yarn's and longrope's ``mscale``) come from
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` called on the model's config, so every
scaling type computes what transformers computes; the default type is the plain
``1 / base ** (2i / dim)`` that each model's ``compute_default_rope_parameters`` states. The tables
are fixed at load (``model/family.py`` says why: dynamic and longrope rescale by the longest row of
a batch in transformers, which a paged batch of unrelated rows cannot reproduce per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from openlora_ray.model.family import RopeSpec


def inv_freq_and_scaling(config: Any, rope: RopeSpec, device: torch.device) -> tuple[torch.Tensor, float]:
    if rope.rope_type == "default":
        params = config.rope_parameters if rope.layer_type is None else config.rope_parameters[rope.layer_type]
        exponents = torch.arange(0, rope.rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / rope.rotary_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    kwargs = {"layer_type": rope.layer_type} if rope.layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope.rope_type](config, device, **kwargs)
    return inv_freq.to(device), float(scaling)


class RotaryTables(nn.Module):
    """cos/sin of every RoPE setting for a batch's positions, computed once per forward."""

    def __init__(self, config: Any, ropes: Sequence[RopeSpec], device: torch.device) -> None:
        super().__init__()
        self.scalings: list[float] = []
        for i, rope in enumerate(ropes):
            inv_freq, scaling = inv_freq_and_scaling(config, rope, device)
            self.register_buffer(f"inv_freq_{i}", inv_freq, persistent=False)
            self.scalings.append(scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(cos, sin)]`` per setting, each (B, L, rotary_dim) in ``dtype``; positions (B, L)."""
        tables = []
        pos = positions[..., None].float()
        for i, scaling in enumerate(self.scalings):
            freqs = pos * getattr(self, f"inv_freq_{i}")  # (B, L, rotary_dim / 2), float32 as transformers
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if scaling != 1.0:
                cos, sin = cos * scaling, sin * scaling
            tables.append((cos.to(dtype), sin.to(dtype)))
        return tables


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    q: torch.Tensor,  # (B, H, L, hd)
    k: torch.Tensor,  # (B, KVH, L, hd)
    cos: torch.Tensor,  # (B, L, rotary_dim)
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` dims of each head (all of them except on partial-rotary Phi-3)."""
    cos, sin = cos[:, None], sin[:, None]
    rotary_dim = cos.shape[-1]
    if rotary_dim == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, k_rot = q[..., :rotary_dim], k[..., :rotary_dim]
    q = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q[..., rotary_dim:]], dim=-1)
    k = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k[..., rotary_dim:]], dim=-1)
    return q, k
