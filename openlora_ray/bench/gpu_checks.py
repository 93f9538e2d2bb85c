"""The correctness half of ``make gpu-check``: what CI proves on CPU, proved again on the device.

Each check builds what it needs from a small random Llama saved as a real folder (the GPU machine
reaches nothing outside, so no model is downloaded) and returns a ``CheckResult``; a failed
comparison is a failed check, never an exception that hides the others. On CPU the checks that
need CUDA report themselves skipped, with the CPU test that covers them instead.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openlora_ray.bench.lora_bench import ALL_LINEAR
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.engine import Engine
from openlora_ray.engine.request import SamplingParams
from openlora_ray.engine.runner import DecodeRow, ModelRunner
from openlora_ray.engine.sampling import RowContext
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.transfer import TransferredSlots, transfer_for
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.loader import load_hf_model, load_multi_lora_model

log = logging.getLogger(__name__)

CHECK_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
ADAPTERS = 4
RANK = 8
BLOCK = 16
# bfloat16 against PEFT: both are compared with PEFT in float32 on the same device; ours may be off
# by at most twice PEFT's own bfloat16 error plus this (one bf16 rounding of logits of order 1).
BF16_SLACK = 1e-2
GRAPHS_ATOL = 1e-4  # float32: the padded step groups rows differently, so not bit for bit


@dataclass
class CheckResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckModel:
    """A random tiny Llama folder and ``ADAPTERS`` PEFT adapters ``a0..`` beside it."""

    folder: Path
    adapters: Path

    def adapter(self, i: int) -> Path:
        return self.adapters / f"a{i}"


def make_check_model(root: Path) -> CheckModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = root / "model"
    hf = LlamaForCausalLM(LlamaConfig(**CHECK_CONFIG))
    hf.save_pretrained(folder, safe_serialization=True)
    _save_adapters(hf, root / "adapters")
    return CheckModel(folder, root / "adapters")


def _save_adapters(hf: torch.nn.Module, out: Path) -> None:
    """``ADAPTERS`` PEFT adapters on every projection, B non-zero (PEFT starts it at zero) and large
    enough that a wrong adapter changes the logits far beyond the bfloat16 tolerance."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(ALL_LINEAR), lora_dropout=0.0)
    peft_model = get_peft_model(hf, cfg, adapter_name="a0")
    for i in range(1, ADAPTERS):
        peft_model.add_adapter(f"a{i}", cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out, selected_adapters=[f"a{i}" for i in range(ADAPTERS)])


def run_checks(device: torch.device, work: Path | None = None) -> list[CheckResult]:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        model = make_check_model(Path(tmp))
        checks: list[Callable[[CheckModel, torch.device], CheckResult]] = [
            check_peft_bf16,
            check_greedy_equals_generate,
            check_seeded_sampling,
            check_sync_budget,
            check_graphs_equal_eager,
            check_flex_equals_pairs,
            check_side_stream_slot_copy,
        ]
        results = []
        for check in checks:
            try:
                results.append(check(model, device))
            except Exception as e:  # reported as this check's failure; the others still run
                name = check.__name__.removeprefix("check_")
                log.exception("check %s failed", name)  # the traceback, for the GPU run's log
                results.append(CheckResult(name, "fail", f"{type(e).__name__}: {e}"))
        return results


def _slots(model, check: CheckModel, dtype: torch.dtype) -> None:
    for i in range(ADAPTERS):
        model.write_slot(i, load_lora_weights(f"a{i}", check.adapter(i), model.dims, RANK, dtype))


@torch.inference_mode()
def check_peft_bf16(check: CheckModel, device: torch.device) -> CheckResult:
    """A mixed batch (every adapter and base rows) in bfloat16 against PEFT's mixed batch."""
    from peft import PeftModel

    rows = [0, NO_ADAPTER, 1, 2, 3, 0, NO_ADAPTER, 3]
    names = [f"a{s}" if s != NO_ADAPTER else "__base__" for s in rows]
    tokens = torch.randint(
        0, CHECK_CONFIG["vocab_size"], (len(rows), 24), generator=torch.Generator().manual_seed(1)
    ).to(device)
    positions = torch.arange(24, device=device).expand(len(rows), -1)

    def peft(dtype: torch.dtype) -> torch.Tensor:
        base = load_hf_model(check.folder, dtype, device)
        model = PeftModel.from_pretrained(base, check.adapter(0), adapter_name="a0")
        for i in range(1, ADAPTERS):
            model.load_adapter(check.adapter(i), adapter_name=f"a{i}")
        return model.eval()(input_ids=tokens, adapter_names=names).logits.float()

    reference, peft_bf16 = peft(torch.float32), peft(torch.bfloat16)
    ours = load_multi_lora_model(check.folder, num_slots=ADAPTERS, max_rank=RANK, dtype=torch.bfloat16, device=device)
    _slots(ours, check, torch.bfloat16)
    got = ours(tokens, positions, ours.lora_batch(rows)).float()
    base = ours(tokens, positions, None).float()
    err_ours = float((got - reference).abs().max())
    err_peft = float((peft_bf16 - reference).abs().max())
    bound = 2 * err_peft + BF16_SLACK
    effect = float((got - base).abs().max())  # the adapters move the logits far more than the tolerance
    figures = {
        "max_abs_err_ours": err_ours,
        "max_abs_err_peft_bf16": err_peft,
        "bound": bound,
        "adapter_effect": effect,
    }
    status = "pass" if err_ours <= bound and effect > 2 * bound else "fail"
    detail = (
        f"max |ours - PEFT fp32| {err_ours:.4f} <= 2 x PEFT bf16's {err_peft:.4f} + {BF16_SLACK}; "
        f"adapters move logits by {effect:.2f}"
    )
    return CheckResult("peft_bf16", status, detail, figures)


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            3, CHECK_CONFIG["vocab_size"], (int(torch.randint(4, 30, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n)
    ]


def _engine(check: CheckModel, device: torch.device) -> Engine:
    """float32 on every device: greedy equality across kernels needs no bfloat16 near-ties."""
    cfg = EngineConfig(
        model_path=check.folder,
        device=str(device),
        dtype="float32",
        max_seq_len=128,
        num_slots=2,
        max_rank=RANK,
        max_running=8,
        num_kv_blocks=256,
        kv_block_size=BLOCK,
    )
    return Engine(cfg, lambda adapter_id: check.adapters / adapter_id)


def _collect(engine: Engine, jobs: list[tuple[list[int], str | None, SamplingParams]]) -> list[list[int]]:
    async def one(prompt, adapter, params) -> list[int]:
        return [
            t async for out in engine.generate(engine.make_request(prompt, adapter, params)) for t in out.token_ids
        ]

    async def all_of() -> list[list[int]]:
        return await asyncio.wait_for(asyncio.gather(*(one(*job) for job in jobs)), 120)

    return asyncio.run(all_of())


def check_greedy_equals_generate(check: CheckModel, device: torch.device) -> CheckResult:
    """Concurrent greedy requests (base and an adapter) equal transformers' ``generate``."""
    from peft import PeftModel
    from transformers import GenerationConfig

    prompts = _prompts(4, seed=2)
    jobs = [
        (p, "a1" if i == 3 else None, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    engine = _engine(check, device)
    try:
        got = _collect(engine, jobs)
    finally:
        engine.shutdown(drain_timeout_s=1)
    gen_cfg = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    wrong = []
    for (prompt, adapter, _), tokens in zip(jobs, got):
        hf = load_hf_model(check.folder, torch.float32, device)
        if adapter is not None:
            hf = PeftModel.from_pretrained(hf, check.adapters / adapter).merge_and_unload().eval()
        ids = torch.tensor([prompt], device=device)
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)[
            0, len(prompt) :
        ].tolist()
        if tokens != want:
            wrong.append(f"{adapter or 'base'}: {tokens} != {want}")
    detail = (
        "; ".join(wrong) or f"{len(jobs)} concurrent requests (one with adapter a1) equal generate, 16 tokens each"
    )
    return CheckResult("greedy_equals_generate", "fail" if wrong else "pass", detail)


def check_seeded_sampling(check: CheckModel, device: torch.device) -> CheckResult:
    """A seeded request with top-p/top-k and a repetition penalty draws the same tokens alone and in
    a batch of other sampled rows (generators and seen-token indices on the model's device)."""
    params = SamplingParams(
        max_tokens=15, temperature=0.9, top_p=0.9, top_k=50, seed=1234, repetition_penalty=1.3, ignore_eos=True
    )
    prompt = _prompts(1, seed=3)[0]
    others = [
        (p, "a0" if i == 0 else None, SamplingParams(max_tokens=12, temperature=1.0, seed=i))
        for i, p in enumerate(_prompts(3, seed=4))
    ]
    engine = _engine(check, device)
    try:
        alone = _collect(engine, [(prompt, None, params)])[0]
        batched = _collect(engine, [(prompt, None, params), *others])[0]
        other_seed = _collect(engine, [(prompt, None, params.model_copy(update={"seed": 99}))])[0]
    finally:
        engine.shutdown(drain_timeout_s=1)
    ok = alone == batched and other_seed != alone
    return CheckResult(
        "seeded_sampling", "pass" if ok else "fail", f"alone {alone}, batched {batched}, seed 99 {other_seed}"
    )


def _decode_rows(n: int, slots: list[int]) -> list[DecodeRow]:
    return [
        DecodeRow(token=5 + i, position=20 + 3 * i, blocks=list(range(6 * i, 6 * i + 6)), slot=slots[i % len(slots)])
        for i in range(n)
    ]


def _row_contexts(runner: ModelRunner, n: int) -> list[RowContext]:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, repetition_penalty=1.2, logprobs=2),
        SamplingParams(temperature=1.0, frequency_penalty=0.5, logit_bias={7: 3.0}, min_tokens=4),
    ]
    return [RowContext(params[i % 3], runner.new_generator(i), [1, 2, 3], [4, 5], frozenset({2})) for i in range(n)]


def count_syncs(step: Callable[[], object], device: torch.device) -> tuple[int, list[str]]:
    """Host synchronisations during ``step``: CUDA's sync debug mode on a GPU; on CPU the hidden
    scalar reads (``aten._local_scalar_dense``) that would be syncs there, plus the step's one copy."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
        return len(syncs), syncs
    from torch.utils._python_dispatch import TorchDispatchMode

    class Scalars(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket == torch.ops.aten._local_scalar_dense
            return func(*args, **(kwargs or {}))

    with Scalars() as mode:
        step()
    return mode.count + 1, [f"{mode.count} hidden scalar reads", "the sampled tokens' copy"]


def _runner(check: CheckModel, device: torch.device, dtype: torch.dtype, **kw) -> ModelRunner:
    model = load_multi_lora_model(check.folder, num_slots=ADAPTERS, max_rank=RANK, dtype=dtype, device=device)
    _slots(model, check, dtype)
    return ModelRunner(model, num_blocks=128, block_size=BLOCK, **kw)


@torch.inference_mode()
def check_sync_budget(check: CheckModel, device: torch.device) -> CheckResult:
    """At most one device-to-host synchronisation per decode step (16 rows, adapters, penalties)."""
    runner = _runner(check, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = _decode_rows(16, [0, NO_ADAPTER, 1, 2, 3])
    ctx = _row_contexts(runner, len(rows))
    runner.sample(runner.decode(rows), ctx)  # warm-up
    syncs, where = count_syncs(lambda: runner.sample(runner.decode(rows), ctx), device)
    return CheckResult(
        "sync_budget",
        "pass" if syncs <= 1 else "fail",
        f"{syncs} per decode step (budget 1): {where}",
        {"syncs": syncs},
    )


@torch.inference_mode()
def check_flex_equals_pairs(check: CheckModel, device: torch.device) -> CheckResult:
    """Decode through FlexAttention on a token-major cache (compiled on CUDA, eager on CPU) against
    the pair path it replaces, after the rows' contexts are prefilled into both caches."""
    logits = {}
    for flex in (False, True):
        runner = _runner(check, device, torch.float32, flex_decode=flex)
        rows = _decode_rows(12, [0, NO_ADAPTER, 1, 2, 3])
        for i, row in enumerate(rows):
            context = torch.randint(3, CHECK_CONFIG["vocab_size"], (row.position,), generator=torch.Generator().manual_seed(i))
            runner.prefill(context.tolist(), start=0, blocks=row.blocks, slot=row.slot)
        logits[flex] = runner.decode(rows).float()
    diff = float((logits[True] - logits[False]).abs().max())
    same = bool((logits[True].argmax(-1) == logits[False].argmax(-1)).all())
    return CheckResult(
        "flex_equals_pairs",
        "pass" if diff <= 1e-3 and same else "fail",
        f"max |flex - pairs| {diff:.2e} (tolerance 1e-3, float32), same argmax: {same}",
        {"max_abs": diff},
    )


@torch.inference_mode()
def check_graphs_equal_eager(check: CheckModel, device: torch.device) -> CheckResult:
    """The CUDA-graph decode step (``engine/static_decode.py``, captured per bucket) computes the
    eager step's logits; replaying it stays within the sync budget."""
    if device.type != "cuda":
        return CheckResult(
            "graphs_equal_eager",
            "skip",
            "CUDA only (the padded path = eager on CPU: tests/engine/test_static_decode.py)",
        )
    runner = _runner(check, device, torch.float32, cuda_graphs=True)
    graphs = runner.graphs
    if graphs is None:
        return CheckResult("graphs_equal_eager", "fail", "ModelRunner(cuda_graphs=True) built no graphs on CUDA")
    results = {}
    for label, slots in (("base", [NO_ADAPTER]), ("mixed", [0, NO_ADAPTER, 1, 2, 3])):
        for n in (3, 16):
            rows = _decode_rows(n, slots)
            runner.graphs = None
            eager = runner.decode(rows).clone()
            runner.graphs = graphs
            runner.decode(rows)  # capture
            replay = runner.decode(rows)
            results[f"{label}_{n}_max_abs"] = float((replay - eager).abs().max())
            results[f"{label}_{n}_argmax_equal"] = float(bool((replay.argmax(-1) == eager.argmax(-1)).all()))
    rows = _decode_rows(16, [0, NO_ADAPTER, 1])
    ctx = _row_contexts(runner, len(rows))
    runner.sample(runner.decode(rows), ctx)
    syncs, where = count_syncs(lambda: runner.sample(runner.decode(rows), ctx), device)
    results["replay_syncs"] = syncs
    worst = max(v for k, v in results.items() if k.endswith("max_abs"))
    ok = (
        worst <= GRAPHS_ATOL and all(v == 1.0 for k, v in results.items() if k.endswith("argmax_equal")) and syncs <= 1
    )
    return CheckResult(
        "graphs_equal_eager",
        "pass" if ok else "fail",
        f"max |graph - eager| {worst:.2e} (atol {GRAPHS_ATOL}), {syncs} sync(s) per replayed step: {where}",
        results,
    )


@torch.inference_mode()
def check_side_stream_slot_copy(check: CheckModel, device: torch.device) -> CheckResult:
    """A host-tier adapter copied into a free slot while a decode step runs: pinned on CUDA, written
    on the side stream; the decoding rows' logits are unchanged and the slot holds exactly what an
    inline write gives."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runner = _runner(check, device, dtype)
    model = runner.model
    transfer = transfer_for(device)
    host = load_lora_weights("a3", check.adapter(3), model.dims, RANK, dtype)
    staged = transfer.stage(host)
    pinned = (
        all(a.is_pinned() and b.is_pinned() for a, b in staged.modules.values()) if device.type == "cuda" else None
    )
    rows = _decode_rows(8, [0, NO_ADAPTER, 1])
    model.clear_slot(3)
    before = runner.decode(rows).clone()
    start = time.perf_counter()
    during = runner.decode(rows)  # queued on the compute stream ...
    TransferredSlots(model, transfer).write_slot(3, staged)  # ... while the copy is queued on the side stream
    queued_s = time.perf_counter() - start
    during = during.clone()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    unchanged = bool(torch.equal(before, during))
    reference = load_multi_lora_model(check.folder, num_slots=ADAPTERS, max_rank=RANK, dtype=dtype, device=device)
    reference.write_slot(3, host)
    same = all(
        torch.equal(group.lora_a[3], reference.layers[i].groups[name].lora_a[3])
        and torch.equal(group.lora_b[3], reference.layers[i].groups[name].lora_b[3])
        for i, layer in enumerate(model.layers)
        for name, group in layer.groups.items()
    )
    ok = unchanged and same and pinned is not False and transfer.ready(3)
    figures = {"decode_plus_queued_copy_ms": queued_s * 1e3}
    detail = f"pinned {pinned}, decoding rows unchanged {unchanged}, slot equal to an inline write {same}"
    return CheckResult("side_stream_slot_copy", "pass" if ok else "fail", detail, figures)
