"""``bench lora`` runs on a model with windowed layers (Gemma 3 alternates local and global ones)."""

from __future__ import annotations

import json

import torch
from family_models import WINDOW, build

from openlora_ray.bench.lora_bench import SHAPES, run


def test_bench_lora_on_a_windowed_model_times_every_shape_and_phase(tmp_path):
    """A decode step of a model with windowed layers needs the windowed pair layout as well (the
    forward refuses one without); a context past the window makes the window matter."""
    model = build("gemma3", tmp_path / "gemma3")
    out = tmp_path / "lora.json"
    run(model, torch.float32, rows=2, context=WINDOW + 3, iters=1, repeats=1, out=out)
    report = json.loads(out.read_text())
    timed = [(r["shape"], r["phase"]) for r in report["results"]]
    assert timed == [(s.name, p) for s in SHAPES for p in ("decode", "prefill")]
    assert all(t > 0 for r in report["results"] for t in r["seconds"].values())
