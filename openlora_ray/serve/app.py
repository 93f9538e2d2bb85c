"""Build the Serve application from one ``AppConfig``.

Usable three ways: ``serve run openlora_ray.serve.app:build_app`` with args (or a config file's
``args:``), ``serve deploy`` of such a file, and ``build(AppConfig(...))`` from Python.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from openlora_ray.serve.config import AppConfig
from openlora_ray.serve.ingress import Ingress
from openlora_ray.serve.replica import LoraReplica

ROUTER_CLASS = "openlora_ray.serve.router:LoraAffinityRouter"
REPLICA_DEPLOYMENT = "LoraReplica"
INGRESS_DEPLOYMENT = "Ingress"


def build(cfg: AppConfig, replica_class: type = LoraReplica, router_class: str = ROUTER_CLASS) -> Application:
    """The application; ``replica_class``/``router_class`` swap in baselines for benchmarks."""
    r = cfg.replicas
    # The config travels to the replicas pickled, not JSON-dumped: JSON would mask store secrets.
    payload = cfg.model_dump()
    replica = serve.deployment(replica_class, name=REPLICA_DEPLOYMENT).options(
        num_replicas=r.num_replicas if r.autoscaling is None else "auto",
        autoscaling_config=r.autoscaling,
        ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
        health_check_period_s=r.health_check_period_s,
        graceful_shutdown_timeout_s=r.graceful_shutdown_timeout_s,
        request_router_config=RequestRouterConfig(
            request_router_class=router_class,
            request_router_kwargs=dict(cfg.router) if router_class == ROUTER_CLASS else {},
            request_routing_stats_period_s=r.stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 5 * r.stats_period_s),
        ),
    )
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT).options(
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus}, max_ongoing_requests=cfg.ingress_max_ongoing_requests
    )
    return ingress.bind(replica.bind(payload), payload)


def build_app(args: dict[str, Any]) -> Application:
    """Entry point for ``serve run``/``serve deploy``: ``args`` is an ``AppConfig`` as a dict."""
    return build(AppConfig.model_validate(args or {}))
