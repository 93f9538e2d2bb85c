"""Every supported model type over HTTP, deployed as ``openlora-ray serve --model DIR`` deploys it.

For each ``model_type`` of the supported table, a tiny random model built from transformers' own
config class (``family_models.py``; Qwen3-MoE's is ``tests/conftest.py``'s) is saved with a real
tokenizer (token ``i`` is the word ``t<iii>``: an answer's text names its token ids). Its
application is what the command line a user would type (``serve --model DIR --config serve.yaml``,
the config sizing the engine for the models' 256 positions) deploys: parsed by the CLI's parser,
configured by ``local_config``, checked by ``check_supported`` and built by ``build`` as ``serve``
does (with the store's folder made beforehand, as ``serve`` makes it). ``serve`` itself starts
Ray and blocks; here one Ray cluster serves every family at once, each as its own application
(``/<model_type>/v1``). The official ``openai`` client asks each for a greedy completion of two
token-id prompts of different lengths (one engine batch, decoding past the 6-token windows),
which must be exactly transformers' ``generate``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from family_models import build, load_hf, save_word_tokenizer, word_ids

from openlora_ray.cli import build_parser
from openlora_ray.model.support import SUPPORTED_MODEL_TYPES

pytestmark = pytest.mark.timeout(300)

# model_type -> the family_models builder of its tiny model (windowed and RoPE-scaled where the type allows)
BUILDERS = {
    "llama": "llama-llama3",
    "mistral": "mistral",
    "qwen2": "qwen2-window",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "mixtral": "mixtral",
}
MAX_TOKENS = 10
PROMPTS = ([17, 3, 250, 9, 41], [5, 88, 120, 7, 64, 33, 201, 2, 99, 140, 12])
# What a user with a model of 256 positions passes as --config (the default max_seq_len is 1024).
SERVE_CONFIG = {
    "engine": {
        "max_seq_len": 64, "num_slots": 1, "max_rank": 8, "max_running": 4, "num_kv_blocks": 32, "kv_block_size": 4,
    },
    "replicas": {
        "num_replicas": 1, "num_cpus": 0, "num_gpus": 0, "health_check_period_s": 2, "graceful_shutdown_timeout_s": 1,
    },
    "ingress_num_cpus": 0,
}


@pytest.fixture(scope="module")
def family_dirs(tiny_qwen3_moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {t: build(family, root / t) for t, family in BUILDERS.items()}
    dirs["qwen3_moe"] = Path(shutil.copytree(tiny_qwen3_moe_dir, root / "qwen3_moe"))
    for path in dirs.values():
        save_word_tokenizer(path)
    return dirs


@pytest.fixture(scope="module")
def apps(serve_url: str, family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    from ray import serve
    from ray.serve.api import RunTarget

    from openlora_ray.model.support import check_supported
    from openlora_ray.serve.app import build as build_app
    from openlora_ray.serve.cli import local_config

    work = tmp_path_factory.mktemp("serve")
    (work / "serve.yaml").write_text(yaml.safe_dump(SERVE_CONFIG))
    targets = []
    for model_type, path in family_dirs.items():
        (work / model_type).mkdir()  # the adapter store: empty, the base model only
        argv = ["serve", "--model", str(path), "--config", str(work / "serve.yaml"), "--store", str(work / model_type)]
        cfg = local_config(build_parser().parse_args(argv))
        check_supported(cfg.model_path(), cfg.engine.max_seq_len)
        targets.append(RunTarget(build_app(cfg), name=model_type, route_prefix=f"/{model_type}"))
    serve.run_many(targets)
    return serve_url


def test_every_supported_model_type_is_served_here():
    assert set(BUILDERS) | {"qwen3_moe"} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_greedy_completions_equal_transformers_generate(apps: str, family_dirs: dict[str, Path], model_type: str):
    from openai import OpenAI
    from transformers import GenerationConfig

    client = OpenAI(base_url=f"{apps}/{model_type}/v1", api_key="unused", timeout=120, max_retries=0)
    (model,) = client.models.list().data  # the base model (the store holds no adapter)
    answer = client.completions.create(
        model=model.id, prompt=[list(p) for p in PROMPTS], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True},
    )
    hf = load_hf(family_dirs[model_type])
    greedy = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert sorted(c.index for c in answer.choices) == list(range(len(PROMPTS)))
    for choice in answer.choices:
        prompt = PROMPTS[choice.index]
        ids, mask = torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, generation_config=greedy)
        assert word_ids(choice.text) == out[0, len(prompt) :].tolist(), choice.index
        assert choice.finish_reason == "length"
