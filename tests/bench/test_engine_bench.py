"""Smoke test of ``bench engine``: the whole benchmark, end to end, on the tiny random Llama."""

from __future__ import annotations

import json
import time

import torch

from openlora_ray.bench.engine_bench import EngineBenchConfig, Workload, run, simulate_static
from openlora_ray.bench.lora_bench import SHAPES

RUNS = (
    "engine_lora_mr2", "engine_lora_mr4", "engine_mixed_mr2", "engine_mixed_mr4", "peft_grouped", "peft_mixed",
    "engine_base_mr2", "engine_base_mr4", "hf_generate",
)


def test_bench_engine_writes_every_run_and_target(tiny_model_dir, tmp_path):
    cfg = EngineBenchConfig(shape=SHAPES[0], requests=4, adapters=2, new_tokens=4, max_prompt=24, rate_per_s=50.0, max_running=(2, 4))
    out = tmp_path / "engine.json"
    run(tiny_model_dir, torch.float32, cfg, out)
    report = json.loads(out.read_text())
    assert set(report["runs"]) == set(RUNS)
    for name, metrics in report["runs"].items():
        # the mixed workload's third request is n = 2: five sequences of four tokens
        assert metrics["completion_tokens"] == (5 if name.startswith("engine_mixed") else 4) * 4, name
        assert metrics["tokens_per_s"] > 0 and metrics["ttft_p99_s"] >= metrics["ttft_p50_s"] > 0, name
        assert metrics["token_latency_p50_s"] > 0, name
    assert report["runs"]["peft_grouped"]["batches"] >= 2  # one adapter per batch
    assert set(report["targets"]) == {
        "lora_throughput_vs_best_peft", "lora_ttft_p99_below_best_peft", "lora_throughput_vs_own_base", "base_throughput_vs_hf_generate",
        "mixed_throughput_vs_plain",
    }
    assert report["best"]["engine_mixed"].startswith("engine_mixed_") and report["ratios"]["engine_mixed_vs_plain_throughput"] > 0
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    assert report["best"]["engine_lora"] in report["runs"] and report["best"]["peft"] in ("peft_grouped", "peft_mixed")
    assert 16 <= report["prompt_tokens"]["min"] <= report["prompt_tokens"]["max"] <= 24


def test_static_baseline_only_batches_requests_that_have_arrived():
    work = Workload(prompts=[[1]] * 3, adapter_ids=["a0"] * 3, arrivals=[0.0, 0.01, 1.0], new_tokens=3, pad_id=0)
    batches = []

    def run_batch(batch):  # 50 ms per batch, first token after 10 ms
        batches.append(batch)
        start = time.perf_counter()
        time.sleep(0.05)
        return [[7, 7, 7]] * len(batch), start + 0.01

    result = simulate_static(work, lambda arrived: arrived, run_batch)
    # Request 1 arrives while request 0's batch runs, and request 2 long after both finished.
    assert batches == [[0], [1], [2]] and result.batches == 3
    assert 1.05 <= result.makespan_s < 1.5
    first, second, third = result.completions
    assert 0.01 <= first.ttft_s < 0.2 and first.token_latency_s >= 0.04 / 2
    assert second.ttft_s >= 0.05  # waited for the first batch, then its own first step
    assert 0.01 <= third.ttft_s < 0.2  # the clock jumped to its arrival: no waiting counted
