"""``bench scaling`` end to end at a toy size: adapters written into a store, every tier used."""

from __future__ import annotations

import dataclasses
import json

import pytest

from openlora_ray.bench.scaling_bench import (
    LoopShare,
    RunResult,
    ScalingConfig,
    make_store,
    repeat_losses,
    run,
    run_order,
)


def test_bench_scaling_serves_every_n_and_distribution_through_the_tiers(tiny_model_dir, tmp_path, capsys):
    cfg = ScalingConfig(
        counts=(3, 12), ranks=(2, 4, 8), num_slots=2, max_running=4, concurrency=6, requests=16,
        prompt_range=(4, 12), output_range=(2, 6), host_cache_mib=1, max_seq_len=64, threads=1,
    )
    report = run(tiny_model_dir, cfg, tmp_path / "scaling.json", tmp_path / "cache")
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["throughput_loss"] == report["throughput_loss"] and set(saved["throughput_loss"]) == {"uniform", "zipf"}
    assert set(saved["throughput_loss_whole_run"]) == {"uniform", "zipf"}
    assert saved["cpu"] and saved["target_loss"] == 0.05
    assert all(len(each) == 1 for each in saved["throughput_loss_by_repeat"].values())
    runs = {(r["adapters"], r["distribution"]): r for r in saved["runs"]}
    assert set(runs) == {(3, "uniform"), (3, "zipf"), (12, "uniform"), (12, "zipf")}
    for r in runs.values():
        assert r["errors"] == 0 and r["requests"] == 16 and r["req_per_s"] > 0 and r["rss_max_mib"] > 0
        assert r["steady_tok_per_s"] > 0
        assert r["lora_op"] == "auto" and r["lora_op_used"] in {"kernel", "bmm", "bmm+kernel"}
        assert r["ttft_p99_s"] >= r["ttft_p50_s"] > 0
        assert r["store_downloads"] == 0  # the node cache was warmed before the clock
        loop = r["loop"]
        assert loop["steps"] > 0 and 0 < loop["rows_per_step"] <= cfg.max_running and loop["ms_per_step"] > 0
        shares = [loop[p] for p in ("step", "prefill", "sample", "convert", "slot_write")]
        assert all(s >= 0 for s in shares) and 0 < sum(shares) <= 1 and loop["step"] > 0
        assert loop["prefill"] == 0  # every chunk joined a step's forward (none asked for prompt logprobs)
    big = runs[(12, "uniform")]
    assert big["distinct"] > 2 and big["evictions"] > 0 and big["disk_loads"] > 2
    assert runs[(3, "uniform")]["tokens"] == big["tokens"]  # the same lengths for every configuration
    out = capsys.readouterr().out
    assert "where the engine loop's time went" in out
    assert runs[(12, "uniform")]["loop"]["convert"] > 0 and runs[(12, "uniform")]["loop"]["slot_write"] > 0
    assert "bench scaling on" in out and "uniform: steady throughput" in out and "memory-traffic model" in out
    bound = saved["traffic_model"]["by_distribution"]["uniform"]
    assert bound["distinct_lo"] == pytest.approx(3 * (1 - (2 / 3) ** 4))  # 4 rows over 3 adapters
    assert bound["distinct_lo"] < bound["distinct_hi"] <= 4
    assert 0 < bound["min_loss"] < 1 and bound["traffic_x"] == pytest.approx(1 / (1 - bound["min_loss"]))

    # A rerun reuses the adapters already written (nothing is rewritten: same files, same times).
    store = make_store(tiny_model_dir, cfg, tmp_path / "cache")
    files = sorted(store.rglob("adapter_model.safetensors"))
    assert len(files) == 12
    stamps = [f.stat().st_mtime_ns for f in files]
    make_store(tiny_model_dir, cfg, tmp_path / "cache")
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_repeats_alternate_the_order_of_n_and_the_loss_pairs_runs_of_the_same_repeat():
    cfg = ScalingConfig(counts=(5, 100, 2000), distributions=("uniform",), repeats=3)
    assert [(k, n) for k, n, _ in run_order(cfg)] == [(0, 5), (0, 100), (0, 2000), (1, 2000), (1, 100), (1, 5),
                                                       (2, 5), (2, 100), (2, 2000)]
    steady = {(5, 0): 100.0, (2000, 0): 90.0, (5, 1): 80.0, (2000, 1): 80.0, (5, 2): 50.0, (2000, 2): 60.0}
    template = RunResult(
        adapters=0, distribution="uniform", repeat=0, distinct=0, requests=1, tokens=1, makespan_s=1.0, req_per_s=1.0,
        tok_per_s=1.0, steady_tok_per_s=0.0, ttft_p50_s=0.0, ttft_p99_s=0.0, slot_hits=0, host_loads=0, disk_loads=0,
        store_downloads=0, evictions=0, rss_max_mib=0.0,
        loop=LoopShare(steps=1, rows_per_step=1.0, ms_per_step=1.0, step=1.0, prefill=0.0, sample=0.0, convert=0.0,
                       slot_write=0.0),
    )
    results = [dataclasses.replace(template, adapters=n, repeat=k, steady_tok_per_s=v) for (n, k), v in steady.items()]
    assert repeat_losses(results, cfg, "uniform", "steady_tok_per_s") == pytest.approx([0.1, 0.0, -0.2])
    # Runs of another LoRA op, side by side in the same repeats, are paired with their own op only.
    results += [dataclasses.replace(r, lora_op="bmm", steady_tok_per_s=r.steady_tok_per_s / 2 if r.adapters > 5 else 80)
                for r in results]
    assert repeat_losses(results, cfg, "uniform", "steady_tok_per_s") == pytest.approx([0.1, 0.0, -0.2])
    assert repeat_losses(results, cfg, "uniform", "steady_tok_per_s", "bmm") == pytest.approx([0.4375, 0.5, 0.625])
