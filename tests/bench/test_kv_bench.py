"""``bench kv`` end to end on the tiny model: both engines (the fixed-row one from git) run."""

from __future__ import annotations

import json
import subprocess

import pytest

from openlora_ray.bench.kv_bench import FIXED_ROW_ENGINE, REPO, KvBenchConfig, run


def _has_baseline_commit() -> bool:
    try:
        return subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{FIXED_ROW_ENGINE}^{{commit}}"], capture_output=True).returncode == 0
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_baseline_commit(), reason="needs a git checkout holding the fixed-row engine's commit")


def test_bench_kv_runs_every_system_and_reports_the_ratios(tiny_model_dir, tmp_path, capsys):
    cfg = KvBenchConfig(
        kv_tokens=512, max_seq_len=128, paged_max_running=16, block_size=8, adapters=2,
        mix_requests=8, mix_rate_per_s=50.0, prompt_range=(4, 80), prompt_median=20, output_range=(2, 40), output_median=10,
        shared_requests=8, shared_rate_per_s=50.0, system_tokens=40, user_range=(2, 6), shared_new_tokens=4,
    )
    report = run(tiny_model_dir, cfg, tmp_path / "kv.json", threads=1)
    assert [s["system"] for s in report["memory"] + report["prefix"]] == ["fixed-row", "paged", "prefix-off", "prefix-on"]
    assert report["fixed_rows"] == 4 and report["memory"][0]["in_flight_max"] <= 4
    assert report["prefix"][1]["prefix_hit_rate"] > 0.5 and report["prefix"][0]["prefix_hit_rate"] == 0
    assert json.loads((tmp_path / "kv.json").read_text())["in_flight_x"] == report["in_flight_x"]
    assert "sequences in flight" in capsys.readouterr().out
