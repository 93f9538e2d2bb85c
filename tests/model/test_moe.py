"""The sparse MLP against transformers' own MoE blocks (Qwen3-MoE, Mixtral) on tiny random configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from openlora_ray.model.moe import MoeMlp

TINY_MOE = {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu"}


def random_block(block: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():  # the router's weights start at zero in transformers
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return block.eval()


def qwen3_block(norm_topk_prob: bool, seed: int = 0):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    return random_block(Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(**TINY_MOE, norm_topk_prob=norm_topk_prob)), seed)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 17), (2, 9)])
def test_qwen3_moe_block_equals_transformers(norm_topk_prob, shape):
    block = qwen3_block(norm_topk_prob)
    ours = MoeMlp(block, SimpleNamespace(activation="silu"), num_slots=2, max_rank=8, transposed=False)
    x = torch.randn(*shape, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, {}), block(x), rtol=1e-5, atol=1e-5)
    assert len(ours.groups) == 0  # nothing in it holds LoRA slots


def test_the_router_renormalises_only_with_norm_topk_prob():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for flag in (False, True):
        ours = MoeMlp(qwen3_block(flag), SimpleNamespace(activation="silu"), num_slots=1, max_rank=1, transposed=False)
        weights, experts = ours.route(x)
        assert weights.shape == experts.shape == (5, 2) and experts.max() < 8
        sums = weights.sum(-1)
        assert torch.allclose(sums, torch.ones(5)) == flag and bool((sums <= 1 + 1e-6).all())


def test_mixtral_block_equals_transformers():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    block = random_block(MixtralSparseMoeBlock(cfg), seed=3)
    ours = MoeMlp(block, SimpleNamespace(activation="silu"), num_slots=1, max_rank=1, transposed=False)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, {}), block(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_stays_within_rounding_of_transformers():
    block = qwen3_block(norm_topk_prob=True).to(torch.bfloat16)
    ours = MoeMlp(block, SimpleNamespace(activation="silu"), num_slots=1, max_rank=1, transposed=False)
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, {}), block(x), rtol=2e-2, atol=2e-2)
