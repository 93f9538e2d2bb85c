"""The measuring half of ``make gpu-check``: decode steps of a Llama-3.1-8B-shaped random model.

32 rows, each its own rank-16 adapter on all seven projections, against the same rows on the base
model alone, through the engine's ``ModelRunner`` (eager, and its CUDA-graph step on CUDA). A
decode step at batch 32 reads every weight once, so its floor is the bytes it reads over the
device's memory bandwidth; that bandwidth is measured in the same run (a device-to-device copy:
bytes read plus bytes written per second), and each step is reported as a fraction of that
floor. Weights are random and built from a config on the device: the machine reaches nothing
outside, and speed does not depend on the values.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from openlora_ray.engine.runner import DecodeRow, ModelRunner
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.transfer import TransferredSlots, transfer_for
from openlora_ray.lora.weights import LoraWeights
from openlora_ray.model.layout import choose_transposed
from openlora_ray.model.llama import MultiLoraLlama

# Llama-3.1-8B's shapes (its llama3 RoPE scaling changes no shape and is left out).
LLAMA_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
SIZES = {"8b": LLAMA_8B, "tiny": TINY}
BLOCK = 16


@dataclass(frozen=True)
class DecodeSetup:
    rows: int
    rank: int
    context: int  # tokens already in each row's cache; the step decodes the next one
    iters: int
    repeats: int


def build_model(
    config: dict, dtype: torch.dtype, device: torch.device, *, num_slots: int, max_rank: int
) -> MultiLoraLlama:
    """A random model of ``config``'s shapes, initialised on the device in ``dtype`` (an 8B model
    never exists in float32 or on the host)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    hf = hf.eval().requires_grad_(False)
    transposed = choose_transposed(device, dtype, config["hidden_size"], 2 * config["intermediate_size"])
    return MultiLoraLlama(hf, num_slots, max_rank, transposed=transposed).eval().requires_grad_(False)


def random_adapter(model: MultiLoraLlama, name: str, rank: int, gen: torch.Generator) -> LoraWeights:
    """Rank-``rank`` A and scaled B^T for every projection of every layer, made on the device."""
    modules = {}
    for i, layer in enumerate(model.layers):
        for group in layer.groups.values():
            fan_in = group.lora_a.shape[-1]
            for proj, out in zip(group.names, group.out_splits):
                a = torch.randn(rank, fan_in, generator=gen, device=model.device, dtype=model.dtype) * 0.02
                b = torch.randn(rank, out, generator=gen, device=model.device, dtype=model.dtype) * 0.02
                modules[(i, proj)] = (a, b)
    return LoraWeights(name, rank, modules, digest=name)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    variants: dict[str, Callable[[], object]], device: torch.device, iters: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call, variants interleaved in blocks, the device drained around each block."""
    for fn in variants.values():
        for _ in range(3):  # warm-up; the first CUDA-graph call captures
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(s) for name, s in samples.items()}


def bytes_read(model: MultiLoraLlama, rows: int, context: int) -> int:
    """What a base decode step must read: every projection, norm and the LM head once, plus each
    row's keys and values (the embedding table is only gathered from)."""
    total = model.lm_head.weight.nbytes + model.norm.weight.nbytes
    for layer in model.layers:
        for group in layer.groups.values():
            total += group.weight.nbytes + (group.bias.nbytes if group.bias is not None else 0)
        total += sum(m.weight.nbytes for m in (layer.input_norm, layer.mlp_norm))
    d = model.dims
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * model.dtype.itemsize * rows * (context + 1)
    return total + kv


def run_decode(model: MultiLoraLlama, setup: DecodeSetup, graphs: bool) -> dict:
    device = model.device
    gen = torch.Generator(device=device).manual_seed(0)
    adapter_bytes = 0
    for slot in range(setup.rows):
        weights = random_adapter(model, f"a{slot}", setup.rank, gen)
        adapter_bytes += weights.nbytes
        model.write_slot(slot, weights)
        del weights
    per_row = -(-(setup.context + 1) // BLOCK)
    runners = {"eager": ModelRunner(model, num_blocks=setup.rows * per_row, block_size=BLOCK)}
    if graphs:
        runners["graphs"] = ModelRunner(model, num_blocks=setup.rows * per_row, block_size=BLOCK, cuda_graphs=True)

    def rows(adapters: bool) -> list[DecodeRow]:
        return [
            DecodeRow(
                token=3 + r,
                position=setup.context,
                blocks=list(range(r * per_row, (r + 1) * per_row)),
                slot=r if adapters else NO_ADAPTER,
            )
            for r in range(setup.rows)
        ]

    base_rows, mixed_rows = rows(False), rows(True)
    variants = {}
    with torch.inference_mode():
        for kind, runner in runners.items():
            variants[f"{kind}_base"] = lambda runner=runner: runner.decode(base_rows)
            variants[f"{kind}_mixed"] = lambda runner=runner: runner.decode(mixed_rows)
        seconds = time_steps(variants, device, setup.iters, setup.repeats)
        load = slot_load(model, runners["graphs" if graphs else "eager"], mixed_rows, setup, gen)
    base_bytes = bytes_read(model, setup.rows, setup.context)
    return {
        "seconds": seconds,
        "base_bytes_read": base_bytes,
        "adapter_bytes_read": adapter_bytes,
        "kinds": list(runners),
        "slot_load": load,
    }


def slot_load(model: MultiLoraLlama, runner: ModelRunner, rows: list[DecodeRow], setup: DecodeSetup, gen) -> dict:
    """One adapter from the host tier into the spare slot (the last, which no row reads): pageable
    and inline (the CPU path) against ``transfer_for(device)`` (pinned, side stream on CUDA); and
    the mixed decode step alone against the same step with that load queued just before it."""
    device, spare = model.device, model.num_slots - 1
    made = random_adapter(model, "spare", setup.rank, gen)
    host = replace(made, modules={k: (a.cpu(), b.cpu()) for k, (a, b) in made.modules.items()})
    transfer = transfer_for(device)
    staged = transfer.stage(host)
    side = TransferredSlots(model, transfer)

    def timed(fn: Callable[[], object]) -> float:
        samples = []
        for _ in range(setup.repeats + 1):  # the first is a warm-up
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples[1:]) * 1e3

    return {
        "adapter_bytes": host.nbytes,
        "pageable_inline_ms": timed(lambda: model.write_slot(spare, host)),
        "transfer_ms": timed(lambda: side.write_slot(spare, staged)),
        "step_alone_ms": timed(lambda: runner.decode(rows)),
        "step_with_load_ms": timed(lambda: (side.write_slot(spare, staged), runner.decode(rows))),
    }


def summarise(decode: dict, setup: DecodeSetup, bandwidth: float) -> list[dict]:
    """One line per runner kind: ms per step, tokens/s, mixed/base, fractions of the bandwidth floor."""
    s = decode["seconds"]
    out = []
    for kind in decode["kinds"]:
        base, mixed = s[f"{kind}_base"], s[f"{kind}_mixed"]
        floor_base = decode["base_bytes_read"] / bandwidth
        floor_mixed = (decode["base_bytes_read"] + decode["adapter_bytes_read"]) / bandwidth
        out.append(
            {
                "runner": kind,
                "base_ms": base * 1e3,
                "mixed_ms": mixed * 1e3,
                "base_tokens_per_s": setup.rows / base,
                "mixed_tokens_per_s": setup.rows / mixed,
                "mixed_vs_base": base / mixed,
                "base_fraction_of_bound": floor_base / base,
                "mixed_fraction_of_bound": floor_mixed / mixed,
            }
        )
    return out
