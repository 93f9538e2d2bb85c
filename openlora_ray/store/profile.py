"""The store's profile: which base model its adapters are for, and the deployment's largest rank.

A store serves one base model. ``openlora-store.json`` at the store root records that model's
dimensions (read from its ``config.json``) and the deployment's ``max_rank``, written once by
``openlora-ray adapters init``. Every push then checks the adapter against them, so an adapter
that no replica could load (wrong widths, layers the base lacks, a rank above the slots') is
refused when it is published instead of at its first request. A store without a profile still
refuses adapters that are inconsistent in themselves (see ``adapter_format``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.errors import OpenLoraError

PROFILE_FILE = "openlora-store.json"


class StoreProfileError(OpenLoraError):
    """A profile that cannot be read, or a push/init that contradicts the recorded one."""


class StoreProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    format: int = 1
    base_model: str | None = Field(None, description="the base model's name, for people (not checked)")
    dims: BaseModelDims
    max_rank: int | None = Field(None, gt=0, description="the largest LoRA rank the deployment's slots hold")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, max_rank: int | None, name: str | None = None) -> "StoreProfile":
        path = Path(model_dir)
        try:
            cfg = json.loads((path / "config.json").read_text())
            dims = BaseModelDims.from_hf_config(cfg)
        except (OSError, ValueError, KeyError) as e:
            raise StoreProfileError(f"{path} is not a Hugging Face model folder with a usable config.json: {e}") from e
        try:
            return cls(base_model=name or cfg.get("_name_or_path") or path.name, dims=dims, max_rank=max_rank)
        except ValidationError as e:
            raise StoreProfileError(f"bad store profile: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from e

    @classmethod
    def parse(cls, data: bytes) -> "StoreProfile":
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "profile"
            raise StoreProfileError(f"the store's {PROFILE_FILE} is damaged: {where}: {first['msg']}") from e

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    def mismatch(self, dims: BaseModelDims, max_rank: int) -> str | None:
        """Why a replica of ``dims`` with slots of ``max_rank`` cannot serve this store; None if it can."""
        if dims != self.dims:
            theirs, ours = dataclasses.asdict(self.dims), dataclasses.asdict(dims)
            diff = ", ".join(f"{k} {theirs[k]} (this model: {ours[k]})" for k in ours if ours[k] != theirs[k])
            return (f"the store serves {self.describe()}; this replica's model differs: {diff}. "
                    "Point the replica at the store of its base model, or serve that model")
        if self.max_rank is not None and max_rank < self.max_rank:
            return (f"the store accepts adapters up to rank {self.max_rank}, this replica's slots hold rank {max_rank} "
                    f"at most: set engine.max_rank to {self.max_rank} (or record a lower max_rank with "
                    "`adapters init --replace`, if no adapter above it was pushed)")
        return None

    def describe(self) -> str:
        d = self.dims
        rank = f", max_rank {self.max_rank}" if self.max_rank else ""
        return (f"{self.base_model or 'a base model'} (hidden {d.hidden_size}, intermediate {d.intermediate_size}, "
                f"{d.num_layers} layers, {d.num_heads}/{d.num_kv_heads} heads of {d.head_dim}{rank})")


def combine_max_rank(*ranks: int | None) -> int | None:
    """The strictest of the ranks that are set (a push checks against the store's and its own)."""
    given = [r for r in ranks if r is not None]
    return min(given) if given else None
