"""The one typed config the whole application is built from (Python, ``serve run`` args, YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openlora_ray.engine.config import EngineSettings
from openlora_ray.serve.auth import AuthSettings
from openlora_ray.serve.limits import LimitSettings
from openlora_ray.serve.tool_calls import ToolCallParser
from openlora_ray.store.settings import StoreSettings

DEMO_MODEL = "demo"


class ReplicaSettings(BaseModel):
    """Placement and scaling of the model replicas (one engine each)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int | None = Field(2, ge=1, description="fixed count; leave null when autoscaling")
    autoscaling: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(1.0, ge=0, description="1 per replica on a GPU cluster; 0 on CPU")
    max_ongoing_requests: int = Field(64, ge=1, description="Serve's per-replica in-flight limit")
    max_queued_requests: int = Field(256, ge=-1, description="per caller, beyond which Serve refuses")
    stats_period_s: float = Field(1.0, gt=0, description="how often replicas report state to routers")
    health_check_period_s: float = Field(5.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "ReplicaSettings":
        if self.autoscaling is not None and self.num_replicas is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.autoscaling is None and self.num_replicas is None:
            raise ValueError("set num_replicas or autoscaling")
        return self


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEMO_MODEL, description="Hugging Face model folder, 'demo' for SmolLM2-135M-Instruct, or gemma3-270m")
    served_model_name: str = Field("smollm2-135m-instruct", description="the name that means 'no adapter'")
    engine: EngineSettings = EngineSettings(num_slots=8, max_rank=16)
    store: StoreSettings | None = Field(None, description="where adapters live; none = base model only")
    replicas: ReplicaSettings = ReplicaSettings()
    router: dict[str, Any] = Field(default_factory=dict, description="RouterSettings fields")
    auth: AuthSettings = Field(description="API keys; required so that turning auth off is a visible choice")
    limits: LimitSettings = LimitSettings()
    tool_call_parser: ToolCallParser = Field(
        "hermes", description="how the model writes tool calls: hermes (<tool_call> JSON; Qwen, Hermes) or none"
    )
    ingress_num_cpus: float = Field(0.5, ge=0)
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="concurrent requests per ingress replica (Serve's default is 5)")

    def model_path(self) -> Path:
        """The model folder, preparing the demo model (or another of ``model prepare``'s) on first use."""
        from openlora_ray.model.prepare import resolve_model

        return resolve_model(None if self.model == DEMO_MODEL else self.model)
