"""``bench store`` runs end to end (tiny iteration count): table on stdout, JSON on disk."""

from __future__ import annotations

import argparse
import json
import uuid

from openlora_ray.store.bench import SMOLLM2_135M, register_bench, write_adapter
from openlora_ray.adapter_format import validate_adapter_dir


def test_generated_adapter_is_valid_for_smollm2(tmp_path):
    size = write_adapter(tmp_path / "a", SMOLLM2_135M, rank=16)
    spec = validate_adapter_dir("bench", tmp_path / "a", SMOLLM2_135M, max_rank=16)
    assert spec.rank == 16 and len(spec.targets) == 30 * 7 and 19e6 < size < 21e6


def test_bench_store_prints_table_and_writes_json(tmp_path, capsys, aws_env):
    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers(dest="bench", required=True))
    out = tmp_path / "store.json"
    args = parser.parse_args(["store", "--iters", "2", "--rank", "4", "--bucket", f"b-{uuid.uuid4().hex[:12]}",
                              "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "cold fetch (resolve, empty cache)" in text and "p50 ms" in text
    data = json.loads(out.read_text())
    assert data["results"]["warm resolve (cache hit)"]["samples"] == 2
    assert set(data["targets"]) == {"cold_p50_ms", "cold_p99_ms", "warm_load_p50_ms"}


def test_bench_store_through_the_cli_measures_the_host_tier_to_slot_copy(tmp_path, capsys, aws_env, tiny_model_dir):
    from openlora_ray.cli import main

    out = tmp_path / "store.json"
    argv = ["bench", "store", "--iters", "3", "--rank", "4", "--model-dir", str(tiny_model_dir),
            "--bucket", f"b-{uuid.uuid4().hex[:12]}", "--out", str(out)]
    assert main(argv) == 0
    assert "host tier -> slot copy" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["results"]["host tier -> slot copy"]["samples"] == 3
    assert data["results"]["host tier -> slot copy"]["p50_ms"] > 0
    assert data["targets"]["host_to_slot_p50_ms"]["target"] == 5.0
