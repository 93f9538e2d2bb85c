"""Engine settings: what an operator sizes per replica (typed, validated, YAML-friendly)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class EngineSettings(BaseModel):
    """Sizing of one engine; the serving config carries these without a model path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = "cpu"
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16")
    num_slots: int = Field(8, ge=1, description="LoRA adapters resident on the device at once")
    max_rank: int = Field(16, ge=1, description="largest LoRA rank accepted; buffers are padded to it")
    max_running: int = Field(16, ge=1, description="sequences in the running batch, at most: a cap on batch size, not memory")
    max_seq_len: int = Field(1024, ge=16, description="prompt + completion tokens per sequence")
    max_queue: int = Field(256, ge=0, description="requests waiting beyond the running ones; more fail fast")
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens prefilled per engine step, at most")
    host_cache_bytes: int = Field(2 << 30, ge=0, description="host-RAM tier for evicted adapters")
    slot_eviction_half_life_s: float = Field(
        0.0,
        ge=0,
        description="0: a new adapter evicts the least recently used unpinned slot; else the one asked for "
        "least lately, request counts halving this often (see lora.slots)",
    )
    memory_budget_bytes: int = Field(4 << 30, ge=0, description="CPU: bytes for weights, adapter slots and KV blocks together")
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1, description="CUDA: share of the device's memory for the same")
    kv_block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    prefix_cache: bool = Field(True, description="reuse the KV blocks of prompt prefixes already computed")
    cuda_graphs: bool = Field(True, description="CUDA: replay decode steps as CUDA graphs per batch-size bucket")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks, overriding what the budget gives (tests, benchmarks)")
    load_workers: int = Field(2, ge=1, description="threads fetching and validating adapters")
    adapter_recheck_s: float = Field(
        1.0, gt=0, description="how long an adapter id's resolved content digest is trusted before it is resolved again"
    )
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of this process (CPU); None = torch's default")


class EngineConfig(EngineSettings):
    model_path: Path
