"""``make gpu-check`` as CI runs it: ``--device cpu`` on a tiny model, a smoke test of the whole run.

The GPU machine runs the same code on CUDA (an 8B-shaped model, CUDA graphs, sync debug mode);
here every check that can run on CPU must pass, and the report must carry what the GPU run will
be read for.
"""

from __future__ import annotations

import json

import pytest

from openlora_ray.bench.gpu_check import main


def test_gpu_check_runs_on_cpu_and_reports_checks_and_decode_figures(tmp_path):
    out = tmp_path / "gpu-check.json"
    assert main(["--device", "cpu", "--rows", "4", "--iters", "1", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {
        "peft_bf16": "pass",
        "greedy_equals_generate": "pass",
        "seeded_sampling": "pass",
        "sync_budget": "pass",
        "graphs_equal_eager": "skip",  # CUDA only
        "flex_equals_pairs": "pass",  # eager flex on CPU
        "side_stream_slot_copy": "pass",
    }
    peft = next(c for c in report["checks"] if c["name"] == "peft_bf16")["figures"]
    assert peft["max_abs_err_ours"] <= peft["bound"] < peft["adapter_effect"]
    assert "torch" in report["device"]  # the CPU model and torch build name the figures
    assert report["size"] == "tiny" and report["setup"]["rows"] == 4 and report["copy_bandwidth_bytes_per_s"] > 0
    (line,) = report["summary"]  # eager only: no CUDA graphs on CPU
    assert line["runner"] == "eager" and line["base_ms"] > 0 and line["mixed_ms"] > 0
    assert line["base_tokens_per_s"] == pytest.approx(4 / (line["base_ms"] / 1e3))
    assert 0 < line["mixed_vs_base"] and 0 < line["base_fraction_of_bound"] < 1
    assert report["decode"]["adapter_bytes_read"] > 0 and report["decode"]["base_bytes_read"] > 0
    load = report["decode"]["slot_load"]  # a host-tier load into the spare slot, alone and beside a step
    assert load["adapter_bytes"] > 0 and report["device_type"] == "cpu"
    assert all(load[k] > 0 for k in ("pageable_inline_ms", "transfer_ms", "step_alone_ms", "step_with_load_ms"))
