"""The loader refuses, before any weight is read, what the engine cannot serve, naming the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from openlora_ray.model.generation_config import read_generation_defaults
from openlora_ray.model.loader import load_multi_lora_model
from openlora_ray.model.support import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedModelError,
    position_limit,
    problems_of,
)


def edited(src: Path, dst: Path, **changes) -> Path:
    """A copy of a model folder whose config.json has ``changes`` applied (None deletes a key)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        cfg.pop(key, None) if value is None else cfg.__setitem__(key, value)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_max_seq_len_beyond_the_positions_is_refused_with_the_limit(tiny_model_dir, tmp_path):
    assert problems_of(tiny_model_dir, max_seq_len=512) == []  # max_position_embeddings = 512
    with pytest.raises(UnsupportedModelError) as e:
        load_multi_lora_model(tiny_model_dir, num_slots=1, max_rank=4, dtype=torch.float32, max_seq_len=513)
    msg = str(e.value)
    assert "max_seq_len 513" in msg and "max_position_embeddings = 512" in msg
    assert "set the engine's max_seq_len to at most 512" in msg


@pytest.mark.parametrize(
    ("rope", "limit"),
    [
        # Qwen2.5 / Qwen3 long context: yarn x4 of the original 32768
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
        ({"type": "yarn", "factor": 2.0}, 65536),  # transformers 4's key, original from max_position_embeddings
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, 32768),  # already extended
        ({"rope_type": "linear", "factor": 8.0}, 32768),  # Gemma 3: max_position_embeddings names the trained length
        ({"rope_type": "dynamic", "factor": 4.0}, 32768),  # batch-dependent beyond it in transformers: not extended
        ({"rope_type": "longrope", "original_max_position_embeddings": 4096}, 4096),  # Phi-3 128k: short factors only
    ],
)
def test_position_limit_follows_the_rope_scaling_type(rope, limit):
    cfg = {"max_position_embeddings": 32768, "rope_scaling": rope}
    assert position_limit(cfg).tokens == limit
    per_layer_type = {"max_position_embeddings": 32768, "rope_parameters": {"full_attention": rope, "sliding_attention": {"rope_type": "default"}}}
    assert position_limit(per_layer_type).tokens == limit


def test_yarn_extends_what_the_loader_accepts(tiny_model_dir, tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}
    folder = edited(tiny_model_dir, tmp_path / "yarn", rope_scaling=rope, rope_parameters=rope)
    assert problems_of(folder, max_seq_len=2048) == []
    (problem,) = problems_of(folder, max_seq_len=2049)
    assert "yarn RoPE scaling: original_max_position_embeddings 512 x factor 4.0" in problem


def test_a_quantized_checkpoint_is_refused_before_loading(tiny_model_dir, tmp_path):
    folder = edited(tiny_model_dir, tmp_path / "gptq", quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(UnsupportedModelError) as e:
        load_multi_lora_model(folder, num_slots=1, max_rank=4, dtype=torch.float32)
    assert "quant_method 'gptq'" in str(e.value) and "serve the unquantized" in str(e.value)


def test_a_model_type_outside_the_table_is_refused_with_the_table(tiny_model_dir, tmp_path):
    folder = edited(tiny_model_dir, tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError) as e:
        load_multi_lora_model(folder, num_slots=1, max_rank=4, dtype=torch.float32)
    msg = str(e.value)
    assert "model type 'gpt2' (GPT2LMHeadModel) is not supported" in msg and "llama" in msg and "README" in msg


def test_every_problem_is_listed(tiny_model_dir, tmp_path):
    folder = edited(tiny_model_dir, tmp_path / "bad", model_type="gpt2", quantization_config={"quant_method": "awq"})
    assert len(problems_of(folder, max_seq_len=10_000)) == 3


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        problems_of(tmp_path)


def test_generation_config_adds_its_eos_list_and_sampling_defaults(tiny_model_dir, tmp_path):
    folder = edited(tiny_model_dir, tmp_path / "instruct", eos_token_id=1)
    (folder / "generation_config.json").unlink()
    assert read_generation_defaults(folder).eos_token_ids == {1}
    gen = {"eos_token_id": [1, 8, 9], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    defaults = read_generation_defaults(folder)
    assert defaults.eos_token_ids == {1, 8, 9}
    assert defaults.sampling == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def test_the_table_is_the_families_the_forward_has_a_spec_for():
    from openlora_ray.model.family import TRAITS

    assert set(SUPPORTED_MODEL_TYPES) == set(TRAITS)
