"""generation_config.json through the engine: its EOS list ends answers, its sampling fills unset fields."""

from __future__ import annotations

import json
import shutil

import pytest
from engine_helpers import collect

from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams
from openlora_ray.model.support import UnsupportedModelError

PROMPT = [5, 17, 42, 99, 3, 120]


@pytest.fixture
def instruct_dir(tiny_model_dir, tmp_path):
    """The tiny model as Llama 3 Instruct ships: config.json names one EOS id, generation_config.json more."""
    folder = tmp_path / "instruct"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 255}))
    (folder / "generation_config.json").unlink()  # save_pretrained's copy of config.json's ids
    return folder


async def test_an_eos_id_only_generation_config_lists_ends_the_answer(engine_factory, instruct_dir):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    engine = engine_factory(EngineConfig(model_path=instruct_dir, max_seq_len=64, num_kv_blocks=16))
    free_run, _, last = await collect(engine, engine.make_request(PROMPT, params=greedy))
    assert last.finish_reason == "length" and 255 not in free_run
    # the first token that did not come before: an <|eot_id|>-like id the answer reaches at step k
    k = next(i for i in range(2, len(free_run)) if free_run[i] not in free_run[:i])
    (instruct_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [255, 254, free_run[k]]}))

    engine = engine_factory(EngineConfig(model_path=instruct_dir, max_seq_len=64, num_kv_blocks=16))
    assert engine.eos_ids == {255, 254, free_run[k]}
    ended, _, last = await collect(engine, engine.make_request(PROMPT, params=greedy))
    assert ended == free_run[: k + 1] and last.finish_reason == "stop"


async def test_sampling_defaults_fill_only_what_the_request_left_unset(engine_factory, instruct_dir):
    (instruct_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 20, "top_p": 0.9}))
    engine = engine_factory(EngineConfig(model_path=instruct_dir, max_seq_len=64, num_kv_blocks=16))
    unset = engine.make_request(PROMPT, params=SamplingParams(max_tokens=4)).params
    assert (unset.temperature, unset.top_k, unset.top_p, unset.max_tokens) == (0.0, 20, 0.9, 4)
    explicit = engine.make_request(PROMPT, params=SamplingParams(temperature=1.0, top_p=1.0)).params
    assert (explicit.temperature, explicit.top_k, explicit.top_p) == (1.0, 20, 1.0)  # set to the default: kept
    assert engine.make_request(PROMPT).params.temperature == 0.0
    # the defaults make an unset request greedy: two runs agree
    runs = [await collect(engine, engine.make_request(PROMPT, params=SamplingParams(max_tokens=6))) for _ in range(2)]
    assert runs[0][0] == runs[1][0]


def test_sampling_defaults_the_sampler_cannot_use_stop_the_engine(engine_factory, instruct_dir):
    (instruct_dir / "generation_config.json").write_text(json.dumps({"temperature": 7.0}))
    with pytest.raises(UnsupportedModelError, match="generation_config.json's sampling defaults"):
        engine_factory(EngineConfig(model_path=instruct_dir, max_seq_len=64, num_kv_blocks=16))


def test_max_seq_len_beyond_the_positions_stops_the_engine(engine_factory, instruct_dir):
    with pytest.raises(UnsupportedModelError, match="at most 512"):
        engine_factory(EngineConfig(model_path=instruct_dir, max_seq_len=4096, num_kv_blocks=16))
