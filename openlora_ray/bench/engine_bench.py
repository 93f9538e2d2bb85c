"""``openlora-ray bench engine``: the generation engine against PEFT and ``transformers`` ``generate``.

One seeded workload (prompts of varied length, an adapter per request, Poisson arrivals, a fixed
number of greedy new tokens with EOS ignored) goes, in one process, through:

* the engine with LoRA adapters, once per ``max_running`` setting (the best one is compared);
* PEFT, grouped: one static batch per adapter (``set_adapter`` + ``generate``);
* PEFT, mixed: static batches of whatever has arrived, with ``adapter_names=`` in ``generate``;
* the engine with no adapters, and ``transformers`` ``generate`` on the base model;
* the engine with adapters on the *mixed* workload: the same prompts, adapters and arrivals with
  the settings real clients send (``mixed_params``: log probabilities, JSON-schema output,
  ``n`` = 2 with seeded sampling, penalties, min_p and stop strings), against the plain greedy rows of the same run,
  so that what those features cost is measured rather than assumed. (Streamed or not is an HTTP
  matter: the engine streams every request alike.)

The engine is fed in real time: each request is submitted at its arrival time. A static-batch
baseline cannot take a request before it arrives either, so it is simulated on the same clock:
whenever the model is free, the next batch is launched from the requests that have arrived by
then (the clock jumps to the next arrival if none has), and the clock advances by the measured
wall time of that ``generate`` call. A request's time to first token is the time from its arrival
to the end of its batch's first decoding step; its per-token latency is the rest of the batch's
time divided by the remaining tokens. Throughput is completion tokens over the time from the
first arrival to the last token, for every system alike.

Everything starts warm: the engine's adapters are loaded into slots and every model has run once
before the clock starts, because PEFT holds all its adapters in memory from the outset. Every run
happens in a fresh process (``isolated``).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import platform
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from openlora_ray.bench.lora_bench import Shape, _make_peft_adapters
from openlora_ray.bench.timing import cpu_model, print_table, write_json
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.constraints import ConstraintSpec
from openlora_ray.engine.engine import Engine
from openlora_ray.engine.request import SamplingParams
from openlora_ray.errors import OpenLoraError
from openlora_ray.model.loader import load_hf_model

log = logging.getLogger(__name__)

# Words for the synthetic chat prompts: their content does not matter (EOS is ignored), only that
# they are real text of a chosen length, tokenised as a user's message would be.
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "river", "stones", "glisten", "under", "morning", "light", "engineers", "measure", "latency", "across", "many", "adapters", "and", "small", "models", "answer", "questions", "about", "history", "science", "music", "cooking", "travel", "weather", "gardens", "mountains", "oceans", "cities", "libraries", "please", "explain", "summarise", "compare", "describe", "why", "how", "when", "where", "which", "budget", "schedule"]

# Targets (issue 12, engine v2).
TARGET_LORA_THROUGHPUT_X = 3.0  # engine with adapters vs the better PEFT baseline
TARGET_LORA_VS_BASE_X = 0.9  # engine with 16 distinct adapters vs the same engine without adapters
TARGET_BASE_THROUGHPUT_X = 2.0  # engine without adapters vs transformers generate
TARGET_MIXED_VS_PLAIN_X = 0.9  # issue 15: the mixed workload within 10% of the plain one
MIXED_STOP = ("\n\nUser:", "<|stop|>")  # matched on every character, seldom found
MIXED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class EngineBenchConfig:
    """The workload and the engine settings tried; the defaults are issue 3's benchmark."""

    shape: Shape
    requests: int = 32
    adapters: int = 16
    new_tokens: int = 64
    min_prompt: int = 16
    max_prompt: int = 128
    rate_per_s: float = 8.0  # Poisson arrival rate; high enough that the engine is never idle
    # 48: the mixed workload's n = 2 third makes 43 sequences of 32 requests; a cap of 32 would
    # run the last of them after the others, a batch of a few rows (16 was never the best)
    max_running: tuple[int, ...] = (32, 48)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.new_tokens < 2:
            raise OpenLoraError("new_tokens must be >= 2: per-token latency needs a second token")
        if not 1 <= self.adapters <= self.requests:
            raise OpenLoraError("adapters must be between 1 and the number of requests")
        if not 1 <= self.min_prompt <= self.max_prompt:
            raise OpenLoraError("need 1 <= min_prompt <= max_prompt")


@dataclass(frozen=True)
class Workload:
    """The requests every system serves, in arrival order (``arrivals`` is non-decreasing)."""

    prompts: list[list[int]]
    adapter_ids: list[str]
    arrivals: list[float]  # seconds after the first arrival
    new_tokens: int
    pad_id: int


@dataclass(frozen=True)
class Completion:
    tokens: list[int]
    ttft_s: float  # arrival -> first token
    token_latency_s: float  # mean time per token after the first


@dataclass(frozen=True)
class RunResult:
    completions: list[Completion]  # in request order
    makespan_s: float  # first arrival -> last token
    batches: int | None = None  # static baselines only

    def metrics(self) -> dict[str, Any]:
        ttft = [c.ttft_s for c in self.completions]
        lat = [c.token_latency_s for c in self.completions]
        tokens = sum(len(c.tokens) for c in self.completions)
        return {
            "tokens_per_s": tokens / self.makespan_s,
            "completion_tokens": tokens,
            "makespan_s": self.makespan_s,
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "token_latency_p50_s": float(np.percentile(lat, 50)),
            "token_latency_p99_s": float(np.percentile(lat, 99)),
            "batches": self.batches,
        }


# ------------------------------------------------------------------------------ workload
def _load_tokenizer(model_dir: Path) -> Any:
    """The folder's tokenizer, or None: the tiny test model has none and gets token-id prompts."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _chat_ids(tokenizer: Any, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def make_workload(model_dir: Path, vocab_size: int, cfg: EngineBenchConfig) -> Workload:
    """Seeded prompts, adapters and arrivals.

    With a tokenizer, a prompt is a user message of seeded words through the chat template, grown
    until the whole prompt reaches its drawn length (the template's own tokens count, so the
    shortest prompt is the template plus a few words). Without one, it is random token ids.
    """
    rng = random.Random(cfg.seed)
    tokenizer = _load_tokenizer(model_dir)
    lo = cfg.min_prompt
    if tokenizer is not None:
        overhead = len(_chat_ids(tokenizer, ""))
        lo = max(lo, overhead + 4)
    prompts = []
    for _ in range(cfg.requests):
        length = rng.randint(lo, max(lo, cfg.max_prompt))
        if tokenizer is None:
            prompts.append([rng.randrange(vocab_size) for _ in range(length)])
            continue
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) < length - overhead:
            words.append(rng.choice(WORDS))
        prompts.append(_chat_ids(tokenizer, " ".join(words).capitalize()))
    adapter_ids = [f"a{i % cfg.adapters}" for i in range(cfg.requests)]
    rng.shuffle(adapter_ids)
    arrivals, t = [], 0.0
    for _ in range(cfg.requests):
        arrivals.append(t)
        t += rng.expovariate(cfg.rate_per_s)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    return Workload(prompts, adapter_ids, arrivals, cfg.new_tokens, pad_id)


# -------------------------------------------------------------------------------- engine
def mixed_params(i: int, new_tokens: int, *, constrained: bool = True) -> list[SamplingParams]:
    """Request ``i`` of the mixed workload (issue 15's), as engine requests (``n`` = 2 is two of
    them, on one prompt: the second finds the first's prompt blocks in the prefix cache). A third
    greedy with ``logprobs: 5``; a third with ``response_format`` json_schema (``MIXED_SCHEMA``,
    sampled with a seed; it ends when the JSON does, so EOS is not ignored there); a third ``n`` = 2
    with top-k, min_p, the three penalties, stop strings and ``logprobs: 1``. Without a tokenizer
    (the tests' tiny model) no grammar can be built: that third is seeded sampling instead."""
    common = {"max_tokens": new_tokens, "ignore_eos": True}
    if i % 3 == 0:
        return [SamplingParams(**common, temperature=0.0, logprobs=5)]
    if i % 3 == 1:
        if constrained:
            schema = ConstraintSpec.for_schema(MIXED_SCHEMA)
            return [SamplingParams(max_tokens=new_tokens, temperature=0.8, seed=i, constraint=schema)]
        return [SamplingParams(**common, temperature=0.8, seed=i)]
    return [
        SamplingParams(
            **common, temperature=1.0, top_k=40, min_p=0.05, seed=1000 * i + j, logprobs=1, stop=list(MIXED_STOP),
            presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1,
        )
        for j in range(2)
    ]


def run_engine(
    model_dir: Path,
    dtype: str,
    work: Workload,
    adapter_dirs: dict[str, Path] | None,
    max_rank: int,
    max_running: int,
    mixed: bool = False,
) -> RunResult:
    """Serve the workload with the engine in real time; ``adapter_dirs`` None = base model only;
    ``mixed``: with ``mixed_params`` instead of greedy decoding."""
    max_seq = max(len(p) for p in work.prompts) + work.new_tokens
    config = EngineConfig(
        model_path=model_dir,
        dtype=dtype,
        num_slots=len(adapter_dirs) if adapter_dirs else 1,
        max_rank=max_rank,
        max_running=max_running,
        max_seq_len=max(16, max_seq),
        max_queue=2 * len(work.prompts),
    )
    engine = Engine(config, adapter_dirs.__getitem__ if adapter_dirs else None)
    try:
        return asyncio.run(_drive_engine(engine, work, adapter_dirs is not None, mixed))
    finally:
        engine.shutdown(drain_timeout_s=1)


async def _drive_engine(engine: Engine, work: Workload, with_adapters: bool, mixed: bool = False) -> RunResult:
    greedy = SamplingParams(max_tokens=work.new_tokens, temperature=0.0, ignore_eos=True)
    adapter_of = work.adapter_ids if with_adapters else [None] * len(work.prompts)
    # Warm-up, untimed: one short request per adapter loads every adapter into a slot.
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    await asyncio.gather(*(_consume(engine, engine.make_request(work.prompts[0][:8], aid, warm)) for aid in sorted(set(adapter_of), key=str)))
    constrained = engine.tokenizer is not None
    params = [mixed_params(i, work.new_tokens, constrained=constrained) if mixed else [greedy] for i in range(len(work.prompts))]
    requests = [[engine.make_request(p, aid, q) for q in qs] for p, aid, qs in zip(work.prompts, adapter_of, params)]
    t0 = time.perf_counter()

    async def serve(i: int, request: Any) -> Completion:
        arrival = t0 + work.arrivals[i]
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        times, tokens = [], []
        async for out in engine.generate(request):
            now = time.perf_counter()
            times += [now] * len(out.token_ids)
            tokens += out.token_ids
        # Measured here, from the scheduled arrival, so a late submission is not hidden.
        return Completion(tokens, times[0] - arrival, (times[-1] - times[0]) / max(1, len(times) - 1))

    completions = await asyncio.gather(*(serve(i, r) for i, rs in enumerate(requests) for r in rs))
    return RunResult(list(completions), time.perf_counter() - t0)


async def _consume(engine: Engine, request: Any) -> None:
    async for _ in engine.generate(request):
        pass


# ------------------------------------------------------------------- static-batch baselines
class _FirstStep(LogitsProcessor):
    """Records when ``generate`` finished its first forward (the batch's first token)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def generate_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, pad_id: int, **kwargs: Any) -> tuple[list[list[int]], float]:
    """One left-padded static ``generate`` batch; returns the new tokens and the first step's time.

    ``eos_token_id=[]`` makes ``generate`` ignore EOS exactly like the engine's ``ignore_eos``
    (``None`` would be filled in from the model's generation config).
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], pad_token_id=pad_id)
    first = _FirstStep()
    out = model.generate(ids, attention_mask=mask, generation_config=cfg, logits_processor=LogitsProcessorList([first]), **kwargs)
    assert first.at is not None and out.shape[1] == width + new_tokens
    return out[:, width:].tolist(), first.at


BatchRunner = Callable[[list[int]], tuple[list[list[int]], float]]  # request indices -> tokens, first-step time
BatchPicker = Callable[[list[int]], list[int]]  # arrived, unserved requests -> the next batch


def simulate_static(work: Workload, pick: BatchPicker, run_batch: BatchRunner) -> RunResult:
    """Serve the workload one static batch at a time on a clock shared with the arrivals."""
    clock = 0.0
    pending = list(range(len(work.prompts)))
    done: dict[int, Completion] = {}
    batches = 0
    while pending:
        arrived = [i for i in pending if work.arrivals[i] <= clock]
        if not arrived:
            clock = work.arrivals[pending[0]]
            continue
        batch = pick(arrived)
        start = time.perf_counter()
        tokens, first_at = run_batch(batch)
        elapsed, first = time.perf_counter() - start, first_at - start
        for i, toks in zip(batch, tokens):
            done[i] = Completion(toks, clock + first - work.arrivals[i], (elapsed - first) / (len(toks) - 1))
        clock += elapsed
        batches += 1
        log.debug("static batch %d: %d request(s), %.2f s, clock %.2f s, %d left", batches, len(batch), elapsed, clock, len(pending) - len(batch))
        pending = [i for i in pending if i not in done]
    return RunResult([done[i] for i in range(len(work.prompts))], clock, batches)


def _all_arrived(arrived: list[int]) -> list[int]:
    return arrived


def _oldest_adapter_group(work: Workload) -> BatchPicker:
    """The arrived requests of the adapter whose request has waited longest."""
    return lambda arrived: [i for i in arrived if work.adapter_ids[i] == work.adapter_ids[arrived[0]]]


def run_peft_grouped(peft_model: Any, work: Workload) -> RunResult:
    def run_batch(batch: list[int]) -> tuple[list[list[int]], float]:
        peft_model.set_adapter(work.adapter_ids[batch[0]])
        return generate_batch(peft_model, [work.prompts[i] for i in batch], work.new_tokens, work.pad_id)

    return simulate_static(work, _oldest_adapter_group(work), run_batch)


def run_peft_mixed(peft_model: Any, work: Workload) -> RunResult:
    def run_batch(batch: list[int]) -> tuple[list[list[int]], float]:
        return generate_batch(peft_model, [work.prompts[i] for i in batch], work.new_tokens, work.pad_id, adapter_names=[work.adapter_ids[i] for i in batch])

    return simulate_static(work, _all_arrived, run_batch)


def run_hf_base(model: torch.nn.Module, work: Workload) -> RunResult:
    return simulate_static(work, _all_arrived, lambda batch: generate_batch(model, [work.prompts[i] for i in batch], work.new_tokens, work.pad_id))


# ------------------------------------------------------------------------------------ run
def isolated(threads: int | None, fn: Callable[..., RunResult | None], *args: Any) -> Any:
    """``fn(*args)`` in a new interpreter, so every system starts from the same clean process.

    Fairness needs it: a process that has run torch in one thread keeps that thread's OpenMP team,
    and the engine's loop thread then runs 1.2-1.5x slower (see ``RawLora``); the baselines would
    also inherit each other's allocator caches and page cache warmth. ``threads`` sets torch's
    intra-op threads in the child (None: torch's default).
    """
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_set_threads, initargs=(threads,)) as pool:
        return pool.submit(fn, *args).result()


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def save_adapters(model_dir: Path, dtype: torch.dtype, shape: Shape, n: int, out_dir: Path, seed: int) -> None:
    """The benchmark's adapters, as PEFT folders ``out_dir/a<i>`` (random, non-zero B)."""
    _make_peft_adapters(load_hf_model(model_dir, dtype), shape, n, out_dir, seed)


def run_peft(model_dir: Path, dtype: torch.dtype, adapters_dir: Path, n: int, work: Workload, grouped: bool) -> RunResult:
    """PEFT with all ``n`` adapters loaded: one adapter per batch (``set_adapter``) or mixed batches."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_hf_model(model_dir, dtype), adapters_dir / "a0", adapter_name="a0")
    for i in range(1, n):
        model.load_adapter(adapters_dir / f"a{i}", adapter_name=f"a{i}")
    model.eval()
    generate_batch(model, [work.prompts[0][:8]], 2, work.pad_id, adapter_names=[work.adapter_ids[0]])  # warm-up, untimed
    return run_peft_grouped(model, work) if grouped else run_peft_mixed(model, work)


def run_generate(model_dir: Path, dtype: torch.dtype, work: Workload) -> RunResult:
    base = load_hf_model(model_dir, dtype)
    generate_batch(base, [work.prompts[0][:8]], 2, work.pad_id)  # warm-up, untimed
    return run_hf_base(base, work)


def run(model_dir: Path, dtype: torch.dtype, cfg: EngineBenchConfig, out: Path, threads: int | None = None) -> dict:
    """Run every system on the same workload, each in a fresh process; write the JSON, print the table."""
    dtype_name = str(dtype).removeprefix("torch.")
    work = make_workload(model_dir, AutoConfig.from_pretrained(model_dir, local_files_only=True).vocab_size, cfg)
    log.info("workload: %d requests, %d adapters, prompts %d-%d tokens, %d new tokens, arrivals over %.1f s",
             cfg.requests, cfg.adapters, min(map(len, work.prompts)), max(map(len, work.prompts)), cfg.new_tokens, work.arrivals[-1])
    runs: dict[str, RunResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters_dir = Path(tmp)
        isolated(threads, save_adapters, model_dir, dtype, cfg.shape, cfg.adapters, adapters_dir, cfg.seed)
        adapter_dirs = {f"a{i}": adapters_dir / f"a{i}" for i in range(cfg.adapters)}
        for mr in cfg.max_running:
            log.info("engine with adapters, max_running=%d", mr)
            runs[f"engine_lora_mr{mr}"] = isolated(threads, run_engine, model_dir, dtype_name, work, adapter_dirs, cfg.shape.rank, mr)
        for mr in cfg.max_running:
            log.info("engine with adapters, mixed workload, max_running=%d", mr)
            runs[f"engine_mixed_mr{mr}"] = isolated(
                threads, run_engine, model_dir, dtype_name, work, adapter_dirs, cfg.shape.rank, mr, True
            )
        log.info("PEFT grouped per adapter (set_adapter + generate)")
        runs["peft_grouped"] = isolated(threads, run_peft, model_dir, dtype, adapters_dir, cfg.adapters, work, True)
        log.info("PEFT mixed batches (adapter_names=)")
        runs["peft_mixed"] = isolated(threads, run_peft, model_dir, dtype, adapters_dir, cfg.adapters, work, False)
    for mr in cfg.max_running:
        log.info("engine base model only, max_running=%d", mr)
        runs[f"engine_base_mr{mr}"] = isolated(threads, run_engine, model_dir, dtype_name, work, None, cfg.shape.rank, mr)
    log.info("transformers generate, base model")
    runs["hf_generate"] = isolated(threads, run_generate, model_dir, dtype, work)
    report = _report(model_dir, dtype_name, cfg, work, runs, threads)
    write_json(out, report)
    _print(report)
    return report


def _best(metrics: dict[str, dict], prefix: str) -> str:
    return max((name for name in metrics if name.startswith(prefix)), key=lambda n: metrics[n]["tokens_per_s"])


def _report(model_dir: Path, dtype: str, cfg: EngineBenchConfig, work: Workload, runs: dict[str, RunResult], threads: int | None) -> dict:
    metrics = {name: r.metrics() for name, r in runs.items()}
    lora, base, mixed = _best(metrics, "engine_lora_"), _best(metrics, "engine_base_"), _best(metrics, "engine_mixed_")
    peft = max(("peft_grouped", "peft_mixed"), key=lambda n: metrics[n]["tokens_per_s"])
    # Greedy tokens that differ from the engine's mean a baseline did different work (or float
    # noise flipped a near tie after left padding changed the matmul shapes); worth seeing.
    for name, ref in (("peft_grouped", lora), ("peft_mixed", lora), ("hf_generate", base)):
        same = sum(a.tokens == b.tokens for a, b in zip(runs[name].completions, runs[ref].completions))
        metrics[name]["same_tokens_as_engine"] = same / len(work.prompts)
    m = metrics
    lora_x = m[lora]["tokens_per_s"] / m[peft]["tokens_per_s"]
    base_x = m[base]["tokens_per_s"] / m["hf_generate"]["tokens_per_s"]
    own_x = m[lora]["tokens_per_s"] / m[base]["tokens_per_s"]
    mixed_x = m[mixed]["tokens_per_s"] / m[lora]["tokens_per_s"]
    lens = [len(p) for p in work.prompts]
    return {
        "benchmark": "engine",
        "model": str(model_dir),
        "dtype": dtype,
        "config": {**asdict(cfg), "shape": cfg.shape.name},
        "prompt_tokens": {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)},
        "arrival_span_s": work.arrivals[-1],
        "threads": threads or torch.get_num_threads(),
        "isolation": "each run in a fresh process",
        "machine": f"{cpu_model()} ({platform.machine()} {torch.backends.cpu.get_cpu_capability()})",
        "runs": metrics,
        "best": {"engine_lora": lora, "engine_base": base, "engine_mixed": mixed, "peft": peft},
        "ratios": {
            "engine_lora_vs_best_peft_throughput": lora_x,
            "engine_lora_vs_peft_grouped_throughput": m[lora]["tokens_per_s"] / m["peft_grouped"]["tokens_per_s"],
            "engine_lora_vs_peft_mixed_throughput": m[lora]["tokens_per_s"] / m["peft_mixed"]["tokens_per_s"],
            "engine_lora_vs_best_peft_ttft_p99": m[lora]["ttft_p99_s"] / m[peft]["ttft_p99_s"],
            "engine_base_vs_hf_generate_throughput": base_x,
            "engine_base_vs_hf_generate_ttft_p99": m[base]["ttft_p99_s"] / m["hf_generate"]["ttft_p99_s"],
            "engine_mixed_vs_plain_throughput": mixed_x,
            "engine_mixed_vs_plain_ttft_p99": m[mixed]["ttft_p99_s"] / m[lora]["ttft_p99_s"],
        },
        "targets": {
            "lora_throughput_vs_best_peft": {"value": lora_x, "target": TARGET_LORA_THROUGHPUT_X, "met": lora_x >= TARGET_LORA_THROUGHPUT_X},
            "lora_ttft_p99_below_best_peft": {"value": m[lora]["ttft_p99_s"], "target": m[peft]["ttft_p99_s"], "met": m[lora]["ttft_p99_s"] < m[peft]["ttft_p99_s"]},
            "lora_throughput_vs_own_base": {"value": own_x, "target": TARGET_LORA_VS_BASE_X, "met": own_x >= TARGET_LORA_VS_BASE_X},
            "base_throughput_vs_hf_generate": {"value": base_x, "target": TARGET_BASE_THROUGHPUT_X, "met": base_x >= TARGET_BASE_THROUGHPUT_X},
            "mixed_throughput_vs_plain": {"value": mixed_x, "target": TARGET_MIXED_VS_PLAIN_X, "met": mixed_x >= TARGET_MIXED_VS_PLAIN_X},
        },
    }


def _print(report: dict) -> None:
    c = report["config"]
    p = report["prompt_tokens"]
    print(
        f"bench engine: {c['requests']} requests over {c['adapters']} adapters ({c['shape']}), prompts {p['min']}-{p['max']} tokens, "
        f"{c['new_tokens']} new tokens, Poisson {c['rate_per_s']}/s, {report['dtype']}, {report['threads']} threads, {report['machine']}"
    )
    runs, best = report["runs"], report["best"]
    baseline = {
        name: best["engine_lora"] if name.startswith("engine_mixed") else best["peft"] if "lora" in name or name.startswith("peft") else "hf_generate"
        for name in runs
    }
    print_table(
        ["run", "tok/s", "x baseline", "TTFT p50 ms", "TTFT p99 ms", "tok lat p50 ms", "tok lat p99 ms", "makespan s", "batches"],
        [
            [
                name + (" *" if name in best.values() else ""),
                r["tokens_per_s"],
                r["tokens_per_s"] / runs[baseline[name]]["tokens_per_s"],
                r["ttft_p50_s"] * 1e3,
                r["ttft_p99_s"] * 1e3,
                r["token_latency_p50_s"] * 1e3,
                r["token_latency_p99_s"] * 1e3,
                r["makespan_s"],
                r["batches"] if r["batches"] is not None else "-",
            ]
            for name, r in runs.items()
        ],
    )
    print(
        "* = the better engine setting / the better PEFT baseline; 'x baseline' = tok/s over the better PEFT (LoRA rows), "
        "transformers generate (base rows) or the better plain engine_lora row (mixed rows: the cost of the features)"
    )
    for name, t in report["targets"].items():
        print(f"target {name}: {t['value']:.3f} vs {t['target']:.3f} -> {'met' if t['met'] else 'MISSED'}")
