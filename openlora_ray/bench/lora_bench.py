"""``openlora-ray bench lora``: the mixed-adapter forward against base-only and against PEFT.

One batch of 16 rows, each row a different adapter, on the demo model; a decode step (one token
per row after a 32-token context) and a prefill step (32 tokens per row); two adapter shapes.
Everything is measured in one process, interleaved, and reported as ratios.
"""

from __future__ import annotations

import logging
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from openlora_ray.bench.timing import cpu_model, print_table, time_interleaved, write_json
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.llama import PagedBatch
from openlora_ray.model.paged_attention import PrefillLayout, build_decode_layout
from openlora_ray.model.loader import load_hf_model, load_multi_lora_model

log = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    name: str
    rank: int
    targets: tuple[str, ...]


SHAPES = (Shape("r16-all", 16, ALL_LINEAR), Shape("r8-qv", 8, ("q_proj", "v_proj")))


def _make_peft_adapters(hf: torch.nn.Module, shape: Shape, n: int, out_dir: Path, seed: int) -> torch.nn.Module:
    """Wrap ``hf`` with ``n`` PEFT adapters of ``shape`` (random, non-zero B) and save each."""
    cfg = LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank + 3, target_modules=list(shape.targets), lora_dropout=0.0)
    peft_model = get_peft_model(hf, cfg, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    peft_model.save_pretrained(out_dir, selected_adapters=[f"a{i}" for i in range(n)])
    return peft_model.eval()


def slot_copier(model_dir: Path, adapter_dir: Path, rank: int) -> Callable[[], None]:
    """One copy of the adapter from the host tier into a slot, float32, set up and warmed up: the
    cost of a SlotManager re-load after an eviction. Each call replaces the slot's contents."""
    model = load_multi_lora_model(model_dir, num_slots=2, max_rank=rank, dtype=torch.float32)
    weights = load_lora_weights("bench", adapter_dir, model.dims, rank, torch.float32)
    model.write_slot(0, weights)  # warm-up: first touch of the slot's pages
    return lambda: model.write_slot(0, weights)


def run(model_dir: Path, dtype: torch.dtype, rows: int, context: int, iters: int, repeats: int, out: Path) -> dict:
    torch.manual_seed(0)
    ours = load_multi_lora_model(model_dir, num_slots=rows, max_rank=max(s.rank for s in SHAPES), dtype=dtype)
    plain_hf = load_hf_model(model_dir, dtype)  # the baseline PEFT builds on, without PEFT's wrappers
    base_bytes = sum(p.nbytes for p in plain_hf.parameters())
    tokens = torch.randint(0, ours.config.vocab_size, (rows, context + 1))
    prompt, next_tok = tokens[:, :context], tokens[:, context:]
    positions = torch.arange(context).expand(rows, -1)
    last = torch.full((rows,), context - 1)
    bs = 16
    per_row = -(-(context + 1) // bs)
    tables = [list(range(r * per_row, (r + 1) * per_row)) for r in range(rows)]
    step_blocks = torch.tensor([t[context // bs] for t in tables])
    step_offsets = torch.full((rows,), context % bs)
    layout = partial(build_decode_layout, tables, [context + 1] * rows, bs, torch.device("cpu"))
    window = ours.spec.sliding_window  # windowed layers (Gemma, Mistral) read the last `window` positions
    windowed = layout(window=window) if window is not None else None
    decode_batch = PagedBatch(step_blocks, step_offsets, layout(), windowed)
    results = []
    for shape in SHAPES:
        hf = load_hf_model(model_dir, dtype)
        with tempfile.TemporaryDirectory() as tmp:
            peft_model = _make_peft_adapters(hf, shape, rows, Path(tmp), seed=len(results))
            adapters = [load_lora_weights(f"a{i}", Path(tmp) / f"a{i}", ours.dims, ours.max_rank, dtype) for i in range(rows)]
        for slot, w in enumerate(adapters):
            ours.write_slot(slot, w)
        # The host tier -> slot copy a SlotManager re-load costs (write_slot replaces the slot).
        copy_s = time_interleaved({"copy": lambda: ours.write_slot(0, adapters[0])}, iters=5, repeats=repeats)["copy"]
        adapter_bytes = sum(w.nbytes for w in adapters)
        names = [f"a{i}" for i in range(rows)]
        mixed = ours.lora_batch(list(range(rows)), one_token=True)  # decode: one token per row
        mixed_prompts = ours.lora_batch(list(range(rows)))
        cache = ours.new_kv_cache(rows * per_row, bs)
        with torch.inference_mode():
            for r in range(rows):  # the engine prefills one sequence per forward
                where = torch.tensor([tables[r][p // bs] for p in range(context)])
                paged = PagedBatch(where, torch.arange(context) % bs, PrefillLayout(torch.tensor(tables[r]), 0))
                ours(prompt[r : r + 1], positions[:1], ours.lora_batch([r]), cache, paged, logits_at=last[:1])
            hf_past = DynamicCache()
            plain_hf(input_ids=prompt, past_key_values=hf_past, use_cache=True)
            peft_past = DynamicCache()
            peft_model(input_ids=prompt, past_key_values=peft_past, use_cache=True, adapter_names=names)
            dec_pos = torch.full((rows, 1), context)
            zero = torch.zeros(rows, dtype=torch.long)

            def hf_decode(model: torch.nn.Module, past: DynamicCache, **kw) -> None:
                model(input_ids=next_tok, past_key_values=past, use_cache=True, **kw)
                past.crop(-1)  # back to the same context length every call

            phases = {
                "decode": {
                    "ours_base": lambda: ours(next_tok, dec_pos, None, cache, decode_batch, logits_at=zero),
                    "ours_mixed": lambda: ours(next_tok, dec_pos, mixed, cache, decode_batch, logits_at=zero),
                    "hf_base": lambda: hf_decode(plain_hf, hf_past),
                    "peft_mixed": lambda: hf_decode(peft_model, peft_past, adapter_names=names),
                },
                "prefill": {
                    "ours_base": lambda: ours(prompt, positions, None, logits_at=last),
                    "ours_mixed": lambda: ours(prompt, positions, mixed_prompts, logits_at=last),
                    "hf_base": lambda: plain_hf(input_ids=prompt, logits_to_keep=1, use_cache=False),
                    "peft_mixed": lambda: peft_model(input_ids=prompt, logits_to_keep=1, use_cache=False, adapter_names=names),
                },
            }
            for phase, variants in phases.items():
                log.info("timing %s %s", shape.name, phase)
                t = time_interleaved(variants, iters=iters if phase == "decode" else max(1, iters // 5), repeats=repeats)
                results.append(
                    {
                        "shape": shape.name,
                        "phase": phase,
                        "seconds": t,
                        "ours_mixed_vs_ours_base": t["ours_base"] / t["ours_mixed"],
                        "peft_mixed_vs_hf_base": t["hf_base"] / t["peft_mixed"],
                        "ours_mixed_vs_peft_mixed": t["peft_mixed"] / t["ours_mixed"],
                        "ours_base_vs_hf_base": t["hf_base"] / t["ours_base"],
                        "bytes_bound": base_bytes / (base_bytes + adapter_bytes),
                        "adapter_bytes": adapter_bytes,
                        "base_bytes": base_bytes,
                        "host_to_slot_copy_s": copy_s,
                    }
                )
        del peft_model, hf
    report = {
        "benchmark": "lora",
        "model": str(model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "context": context,
        "threads": torch.get_num_threads(),
        "machine": f"{cpu_model()} ({platform.machine()} {torch.backends.cpu.get_cpu_capability()})",
        "results": results,
    }
    write_json(out, report)
    _print(report)
    return report


def _print(report: dict) -> None:
    print(f"bench lora: {report['rows']} rows x {report['rows']} distinct adapters, {report['dtype']}, {report['threads']} threads, {report['machine']}")
    print_table(
        ["shape", "phase", "ours base ms", "ours mixed ms", "mixed/base", "PEFT mixed/HF base", "ours/PEFT mixed", "ours base/HF base", "bytes bound", "host->slot ms"],
        [
            [
                r["shape"],
                r["phase"],
                r["seconds"]["ours_base"] * 1e3,
                r["seconds"]["ours_mixed"] * 1e3,
                r["ours_mixed_vs_ours_base"],
                r["peft_mixed_vs_hf_base"],
                r["ours_mixed_vs_peft_mixed"],
                r["ours_base_vs_hf_base"],
                r["bytes_bound"],
                r["host_to_slot_copy_s"] * 1e3,
            ]
            for r in report["results"]
        ],
    )
