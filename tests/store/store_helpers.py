"""Helpers shared by the store tests (a module of its own so spawned processes can import it)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from openlora_ray.store import StoreSettings

WEIGHTS = "adapter_model.safetensors"

class RecordingMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer whose app also appends ``(method, path)`` of every request to ``log``."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.log: list[tuple[str, str]] = []

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def recording(environ, start_response):
            self.log.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
            return app(environ, start_response)

        self._server = make_server(
            self._ip_address, self._port, recording, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, p in list(self.log) if m == method and p.endswith(suffix))


def make_bucket(endpoint: str) -> str:
    name = f"t-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def settings_for(uri: str, cache_dir: Path, endpoint: str | None = None, **kw) -> StoreSettings:
    """Fast-failing settings for tests: short timeouts, few retries, no grace, no memo."""
    defaults = dict(
        region="us-east-1",
        addressing_style="path",
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
        max_attempts=2,
        latest_ttl_s=0.0,
        evict_grace_s=0.0,
    )
    defaults.update(kw)
    return StoreSettings(uri=uri, endpoint_url=endpoint, cache_dir=cache_dir, **defaults)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_peft_adapter(out: Path, seed: int, r: int = 4) -> Path:
    """Save a real PEFT LoRA adapter of a tiny random Llama, with non-zero lora_B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)
    return out


from openlora_ray.adapter_format import BaseModelDims

TINY_LLAMA_DIMS = BaseModelDims(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def cache_files(cache_dir: Path) -> list[Path]:
    """Every file in a cache folder except lock files (which are kept by design)."""
    if not cache_dir.exists():
        return []
    return [p for p in cache_dir.rglob("*") if p.is_file() and ".locks" not in p.parts]



def resolve_in_process(settings_json: str, adapter_id: str, barrier, results) -> None:
    """Child-process body of the cross-process dedupe test (importable for ``spawn``)."""
    from openlora_ray.store import AdapterStore

    store = AdapterStore(StoreSettings.model_validate_json(settings_json))
    barrier.wait()
    results.put(str(store.resolve(adapter_id)))
