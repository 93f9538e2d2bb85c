"""The parts of ``model prepare`` and ``model info`` that need no download."""

from __future__ import annotations

import json
import shutil

from jinja2.sandbox import ImmutableSandboxedEnvironment

from openlora_ray.cli import main
from openlora_ray.model.prepare import GEMMA_TURNS_TEMPLATE, _add_eos


def render(messages, add_generation_prompt=True) -> str:
    """As transformers renders chat templates (a sandboxed Jinja environment, trimmed blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(GEMMA_TURNS_TEMPLATE).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt
    )


def test_gemma_turns_join_the_system_text_to_the_first_user_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert render(messages[1:2], add_generation_prompt=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


def test_end_of_turn_joins_the_eos_list(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 2}))
    _add_eos(tmp_path, 106)
    _add_eos(tmp_path, 106)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": [1, 106], "bos_token_id": 2}


def test_model_info_says_why_not(tiny_model_dir, tmp_path, capsys):
    assert main(["model", "info", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "model type:  llama" in out and "positions:   512" in out and "supported: yes" in out
    folder = tmp_path / "awq"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq"}}))
    assert main(["model", "info", str(folder), "--max-seq-len", "4096"]) == 1
    out = capsys.readouterr().out
    assert "cannot serve: the checkpoint is quantized" in out and "cannot serve: max_seq_len 4096" in out
