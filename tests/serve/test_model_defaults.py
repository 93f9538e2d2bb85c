"""The model's own defaults reach requests that leave fields out, and a model that cannot be served stops `serve`."""

from __future__ import annotations

import json
import shutil

from openlora_ray.cli import main
from openlora_ray.engine.request import SamplingParams
from openlora_ray.serve.openai_api import ChatCompletionRequest


def test_fields_a_request_leaves_out_travel_unset_so_that_the_model_defaults_fill_them():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    params = body.sampling(99)
    sent = params.model_dump(exclude_unset=True)  # what the ingress hands the replica
    assert sent["top_p"] == 0.5 and not {"temperature", "top_k", "repetition_penalty"} & set(sent)
    received = SamplingParams.model_validate(sent)
    assert received.temperature == 1.0 and "temperature" not in received.model_fields_set
    explicit = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=1.0, top_k=-1)
    assert {"temperature", "top_k"} <= set(explicit.sampling(99).model_dump(exclude_unset=True))


def test_serve_refuses_a_model_it_cannot_serve_before_starting_ray(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    assert main(["serve", "--model", str(folder), "--store", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err
    assert "cannot be served" in err and "quant_method 'gptq'" in err
