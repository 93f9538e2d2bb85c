"""Offline validation of the deployment files: deployments/, cluster/ and k8s/.

Each file is checked with the tool that will consume it, as strictly as that tool allows, plus the
checks the tool does not do:

- Serve configs (deployments/*.yaml, and serveConfigV2 inside the RayService): Ray's
  ``ServeDeploySchema``, then a walk over the pydantic models' ``model_fields`` that rejects
  unknown keys (Ray drops them silently: a misspelled ``max_ongoing_request`` would validate and
  do nothing), then each application's ``args`` with ``AppConfig`` (extra=forbid) and the
  free-form dicts inside it (``replicas.autoscaling``, ``router``) with their own models.
- ``ray up`` configs (cluster/*.yaml): Ray's ``prepare_config`` + ``validate_config``, the same
  calls ``ray up`` makes before it talks to the cloud.
- KubeRay documents (k8s/): the CRDs' openAPIV3Schema from ../shared/kuberay, made strict the way
  the API server prunes (unknown fields are errors), with jsonschema Draft 7.
- Built-in kinds: kubernetes-validate's bundled Kubernetes schemas, strict mode.
- PodMonitor: structure only (its CRD is not vendored).
- The references between files: Secrets, volumes, ports, bucket, endpoint, replica bounds.
"""

from __future__ import annotations

import ast
import copy
import shutil
import subprocess
import types
import typing
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ROOT / "deployments"
CLUSTER = ROOT / "cluster"
K8S = ROOT / "k8s"
KUBERAY_CRDS = Path(__file__).resolve().parents[2].parent / "shared" / "kuberay"
K8S_VERSION = "1.32.0"  # Kubernetes API version the built-in kinds are checked against
BUILTIN_KINDS = {"Namespace", "Secret", "PersistentVolumeClaim", "Deployment", "Service", "Job", "StatefulSet", "ConfigMap"}

SERVE_FILES = sorted(DEPLOYMENTS.glob("*.yaml"))
CLUSTER_FILES = sorted(CLUSTER.glob("*.yaml"))
ONPREM_FILES = [p for p in CLUSTER_FILES if yaml.safe_load(p.read_text())["provider"]["type"] == "local"]
CLOUD_FILES = [p for p in CLUSTER_FILES if p not in ONPREM_FILES]
K8S_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]


def k8s_docs() -> Iterator[tuple[Path, dict]]:
    for path in K8S_FILES:
        for doc in load_all(path):
            yield path, doc


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# --------------------------------------------------------------------------- strict pydantic walk
def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def unknown_keys(model: type[BaseModel], data: Any, path: str = "") -> list[str]:
    """Dotted paths of keys in ``data`` that ``model`` (and the models nested in it) do not define."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    by_name = {name: name for name in fields} | {f.alias: name for name, f in fields.items() if f.alias}
    errors = []
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in by_name:
            errors.append(where)
        else:
            errors += _walk(fields[by_name[key]].annotation, value, where)
    return errors


def _walk(annotation: Any, value: Any, path: str) -> list[str]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _walk(args[0], value, path)
    if origin in (typing.Union, types.UnionType):
        # A dict given where a model is one of the choices (e.g. autoscaling_config: Dict |
        # AutoscalingConfig) is held to the model: the Dict choice would accept any typo.
        models = [a for a in args if _is_model(a)]
        if isinstance(value, dict) and models:
            return min((unknown_keys(m, value, path + ".") for m in models), key=len)
        typed = [a for a in args if typing.get_args(a) and typing.get_origin(a) in (list, dict, typing.Annotated)]
        return min((_walk(a, value, path) for a in typed), key=len) if typed else []
    if _is_model(annotation):
        return unknown_keys(annotation, value, path + ".")
    if origin in (list, tuple, typing.Sequence) and args and isinstance(value, (list, tuple)):
        return [e for i, item in enumerate(value) for e in _walk(args[0], item, f"{path}[{i}]")]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return [e for k, v in value.items() for e in _walk(args[1], v, f"{path}.{k}")]
    return []


@lru_cache(maxsize=None)
def app_deployment_names() -> frozenset[str]:
    """The deployment names openlora_ray/serve/app.py defines, read from its source: importing the
    module would import torch and transformers (seconds) for two string constants."""
    tree = ast.parse((ROOT / "openlora_ray" / "serve" / "app.py").read_text())
    names = {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
    }
    return frozenset({names["REPLICA_DEPLOYMENT"], names["INGRESS_DEPLOYMENT"]})


def check_serve_config(config: dict) -> None:
    """What `serve deploy` accepts, strictly, and what the app builder accepts."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from openlora_ray.serve.config import AppConfig
    from openlora_ray.serve.routing import RouterSettings

    ServeDeploySchema.model_validate(config)
    assert unknown_keys(ServeDeploySchema, config) == [], "keys Ray would silently ignore"
    for app in config["applications"]:
        assert app["import_path"] == "openlora_ray.serve.app:build_app"
        cfg = AppConfig.model_validate(app["args"])
        RouterSettings.model_validate(cfg.router)
        if cfg.replicas.autoscaling is not None:
            AutoscalingConfig.model_validate(cfg.replicas.autoscaling)
            assert unknown_keys(AutoscalingConfig, cfg.replicas.autoscaling) == []
        for dep in app.get("deployments", []):
            assert dep["name"] in app_deployment_names(), f"no deployment named {dep['name']!r} in the app"


# ----------------------------------------------------------------------------- deployments/
def test_deployment_files_exist() -> None:
    assert {p.name for p in SERVE_FILES} >= {"local-cpu.yaml", "gpu-cluster.yaml"}


@pytest.mark.parametrize("path", SERVE_FILES, ids=ids(SERVE_FILES))
def test_serve_config_is_valid_and_strict(path: Path) -> None:
    check_serve_config(load(path))


def test_local_config_is_a_loopback_cpu_setup() -> None:
    from openlora_ray.serve.config import AppConfig

    config = load(DEPLOYMENTS / "local-cpu.yaml")
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    cfg = AppConfig.model_validate(config["applications"][0]["args"])
    assert (cfg.engine.device, cfg.replicas.num_gpus, cfg.replicas.num_replicas) == ("cpu", 0, 2)
    assert cfg.store is not None and "://" not in cfg.store.uri  # a local folder
    assert not cfg.auth.enabled  # acceptable only because of the loopback host above


def test_gpu_config_uses_gpus_s3_and_auth() -> None:
    from openlora_ray.serve.config import AppConfig

    config = load(DEPLOYMENTS / "gpu-cluster.yaml")
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"]["host"] == "0.0.0.0"
    cfg = AppConfig.model_validate(config["applications"][0]["args"])
    assert (cfg.engine.device, cfg.engine.dtype, cfg.replicas.num_gpus) == ("cuda", "auto", 1)
    assert cfg.replicas.num_replicas is None and cfg.replicas.autoscaling["min_replicas"] >= 1
    assert cfg.store is not None and cfg.store.uri.startswith("s3://")
    assert cfg.store.endpoint_url is None and cfg.store.secret_access_key is None  # from the environment
    assert cfg.auth.enabled and cfg.auth.keys_file is not None
    assert cfg.replicas.max_ongoing_requests <= cfg.engine.max_running + cfg.engine.max_queue


def _gpu_config() -> dict:
    return load(DEPLOYMENTS / "gpu-cluster.yaml")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_request=8), "applications[0].deployments[0].max_ongoing_request"),
        (lambda c: c["http_options"].update(hots="0.0.0.0"), "http_options.hots"),
        (lambda c: c.update(proxy_locations="EveryNode"), "proxy_locations"),
        (lambda c: c["applications"][0]["deployments"][0]["autoscaling_config"].update(max_replica=3), "autoscaling_config.max_replica"),
        (lambda c: c["applications"][0]["deployments"][0].update(ray_actor_options={"num_gpu": 1}), "ray_actor_options.num_gpu"),
    ],
    ids=["deployment", "http_options", "top-level", "autoscaling", "ray_actor_options"],
)
def test_strict_walk_catches_what_ray_ignores(mutate, expected: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = _gpu_config()
    mutate(config)
    ServeDeploySchema.model_validate(config)  # Ray itself accepts the typo...
    errors = unknown_keys(ServeDeploySchema, config)
    assert any(e.endswith(expected) for e in errors), errors  # ...the walk does not
    with pytest.raises(AssertionError):
        check_serve_config(config)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: a["engine"].update(num_slot=8),
        lambda a: a["replicas"].update(max_ongoing_request=8),
        lambda a: a["replicas"]["autoscaling"].update(max_replica=3),
        lambda a: a["router"].update(spill=2.0),
        lambda a: a["store"].update(endpoint="http://minio:9000"),
        lambda a: a.pop("auth"),
    ],
    ids=["engine", "replicas", "autoscaling", "router", "store", "auth-missing"],
)
def test_app_args_are_strict(mutate) -> None:
    from pydantic import ValidationError

    config = _gpu_config()
    mutate(config["applications"][0]["args"])
    with pytest.raises((ValidationError, AssertionError)):
        check_serve_config(config)


# ----------------------------------------------------------------------------------- cluster/
def ray_up_check(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_files_exist() -> None:
    assert {"aws-gpu.yaml", "gcp-gpu.yaml"} <= {p.name for p in CLOUD_FILES}
    assert [p.name for p in ONPREM_FILES] == ["onprem-gpu.yaml"]


@pytest.mark.parametrize("path", CLOUD_FILES, ids=ids(CLOUD_FILES))
def test_ray_up_config_validates(path: Path) -> None:
    config = load(path)
    prepared = ray_up_check(config)
    # prepare_config merged the provider's defaults and kept our node types.
    assert set(prepared["available_node_types"]) == set(config["available_node_types"])


@pytest.mark.parametrize("path", CLOUD_FILES, ids=ids(CLOUD_FILES))
def test_ray_up_config_shape(path: Path) -> None:
    from openlora_ray.serve.config import AppConfig

    config = load(path)
    types_ = config["available_node_types"]
    head = types_[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "replicas must stay off the head"
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("--metrics-export-port=8080" in c for c in config["head_start_ray_commands"])
    assert any("--metrics-export-port=8080" in c for c in config["worker_start_ray_commands"])
    assert any("openlora_ray" in c or "openlora-ray" in c for c in config["setup_commands"]), "the package must be installed"
    workers = {name: t for name, t in types_.items() if name != config["head_node_type"]}
    assert all(t.get("max_workers", 0) >= t.get("min_workers", 0) for t in workers.values())
    # Serve may ask for up to autoscaling.max_replicas one-GPU replicas: the cluster must be able to add them.
    args = AppConfig.model_validate(_gpu_config()["applications"][0]["args"])
    assert sum(t["max_workers"] for t in workers.values()) >= args.replicas.autoscaling["max_replicas"]
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())
    # The API keys file the Serve config names is copied to every node.
    assert str(args.auth.keys_file) in config["file_mounts"]
    assert any(o.startswith("--env=AWS_ENDPOINT_URL_S3=") for o in config["docker"]["run_options"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(max_worker=3),
        lambda c: next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"]).update(min_worker=1),
        lambda c: next(iter(c["available_node_types"].values())).pop("resources"),
        lambda c: c["docker"].update(imagee="rayproject/ray:2.60.0-py311-gpu"),
        lambda c: c.update(head_node_type="no-such-type"),
    ],
    ids=["top-level-typo", "node-type-typo", "missing-resources", "docker-typo", "bad-head-type"],
)
def test_ray_up_validation_rejects_mistakes(mutate) -> None:
    import jsonschema

    config = load(CLUSTER / "aws-gpu.yaml")
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_check(config)


# The on-premise file (provider `local`): no node types (Ray's local provider makes one from
# head_ip/worker_ips and refuses its own), no docker; the servers' Python runs the commands.
@pytest.mark.parametrize("path", ONPREM_FILES, ids=ids(ONPREM_FILES))
def test_onprem_config_validates(path: Path) -> None:
    config = load(path)
    prepared = ray_up_check(config)
    workers = len(config["provider"]["worker_ips"])
    # Every listed server is kept in the cluster: min = max = the number of worker_ips.
    assert prepared["available_node_types"] == {
        "local.cluster.node": {"node_config": {}, "resources": {}, "min_workers": workers, "max_workers": workers}
    }
    assert prepared["max_workers"] == workers


@pytest.mark.parametrize("path", ONPREM_FILES, ids=ids(ONPREM_FILES))
def test_onprem_config_shape(path: Path) -> None:
    from openlora_ray.serve.config import AppConfig

    config = load(path)
    assert "available_node_types" not in config and "docker" not in config
    assert config["provider"]["head_ip"] not in config["provider"]["worker_ips"]
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    for commands in (head, worker):
        assert commands[0] == "ray stop" and "--metrics-export-port=8080" in commands[-1]
        assert "AWS_ENDPOINT_URL_S3=" in commands[-1]  # the store's endpoint reaches the replicas
    # `ray up` turns autoscaler v2 on, which cannot set up local-provider workers (ray#57153):
    # the head command must switch it off after ray up's own exports, i.e. in the command itself.
    assert 0 <= head[-1].find("RAY_enable_autoscaler_v2=0") < head[-1].index("ray start")
    assert "--address=$RAY_HEAD_IP:6379" in worker[-1]
    assert any("openlora_ray-*.whl" in c for c in config["setup_commands"]), "the package must be installed"
    # The wheel and the API keys file reach every server, where the GPU Serve config looks for them.
    home = Path("/home") / config["auth"]["ssh_user"]
    mounts = {Path(remote.replace("~", str(home), 1)) for remote in config["file_mounts"]}
    args = AppConfig.model_validate(_gpu_config()["applications"][0]["args"])
    assert Path(args.auth.keys_file) in mounts
    setup = " ".join(config["setup_commands"])
    assert any(f"{remote}/openlora_ray-*.whl" in setup for remote in config["file_mounts"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(available_node_types={"gpu": {"resources": {}, "node_config": {}}}),
        lambda c: c["provider"].pop("head_ip"),
        lambda c: c["auth"].update(ssh_usr="ray"),
    ],
    ids=["node-types-on-local", "missing-head-ip", "auth-typo"],
)
def test_onprem_validation_rejects_mistakes(mutate) -> None:
    import click
    import jsonschema

    config = load(CLUSTER / "onprem-gpu.yaml")
    mutate(config)
    # prepare_config aborts (cli_logger.abort: a ClickException) on a bad local-provider section.
    with pytest.raises((jsonschema.ValidationError, click.ClickException)):
        ray_up_check(config)


# -------------------------------------------------------------------------------- k8s: CRDs
def _strict_schema(node: Any) -> Any:
    """A CRD structural schema (OpenAPI v3) as a JSON Schema Draft 7 that errors where the API
    server would prune: int-or-string and nullable made explicit, unknown fields rejected."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k not in ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")}
    if "properties" in node:
        out["properties"] = {name: _strict_schema(s) for name, s in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "additionalProperties" in node:
        out["additionalProperties"] = _strict_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = _strict_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_strict_schema(s) for s in node[key]]
    if "not" in node:
        out["not"] = _strict_schema(node["not"])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


@lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for each version of the vendored KubeRay CRDs."""
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS} (the shared/ folder beside the repo); cannot validate RayService/RayCluster offline")
    schemas = {}
    for path in sorted(KUBERAY_CRDS.glob("ray.io_*.yaml")):
        crd = load(path)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


@lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str) -> Any:
    import jsonschema

    schema = copy.deepcopy(crd_schemas()[(api_version, kind)])
    schema["properties"].pop("status", None)  # written by the operator, never by us
    return jsonschema.Draft7Validator(_strict_schema(schema))


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def rayservice() -> dict:
    return next(doc for _, doc in k8s_docs() if doc["kind"] == "RayService")


def test_kuberay_documents_validate_against_crds() -> None:
    checked = 0
    for path, doc in k8s_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            assert crd_errors(doc) == [], f"{path.name}: {doc['kind']} {doc['metadata']['name']}"
            checked += 1
        if doc["kind"] == "RayService":
            # The same cluster spec as a standalone RayCluster: both CRDs accept it.
            cluster = {"apiVersion": doc["apiVersion"], "kind": "RayCluster", "metadata": {"name": "check"}, "spec": doc["spec"]["rayClusterConfig"]}
            assert crd_errors(cluster) == []
    assert checked >= 1


def _worker(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: _worker(d).update(minReplica=1), "workerGroupSpecs.0"),
        (lambda d: _worker(d).pop("groupName"), "workerGroupSpecs.0"),
        (lambda d: d["spec"].update(upgradeStrategy={"foo": 1}), "spec.upgradeStrategy"),
        (lambda d: d["spec"].update(serveConfig="{}"), "spec"),
        (lambda d: _worker(d)["rayStartParams"].update({"num-cpus": 2}), "rayStartParams.num-cpus"),
        (lambda d: _worker(d)["template"]["spec"]["containers"][0].update(imagePullPolice="Always"), "containers.0"),
        (lambda d: d["spec"]["rayClusterConfig"]["autoscalerOptions"].update(upscalingMode="Fast"), "upscalingMode"),
    ],
    ids=["minReplica-typo", "missing-groupName", "unknown-upgradeStrategy-field", "v1alpha1-field", "non-string-rayStartParam", "container-typo", "bad-enum"],
)
def test_crd_validation_rejects_mistakes(mutate, where: str) -> None:
    doc = copy.deepcopy(rayservice())
    mutate(doc)
    errors = crd_errors(doc)
    assert any(where in e for e in errors), errors


def test_serve_config_v2_is_the_gpu_cluster_config() -> None:
    serve_config = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    check_serve_config(serve_config)
    assert serve_config == _gpu_config(), "k8s/rayservice.yaml serveConfigV2 and deployments/gpu-cluster.yaml differ"


def test_serve_config_v2_typo_is_caught() -> None:
    doc = copy.deepcopy(rayservice())
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("max_ongoing_requests: 256", "max_ongoing_request: 256")
    assert "max_ongoing_request: 256" in doc["spec"]["serveConfigV2"]
    assert crd_errors(doc) == []  # a string to the CRD...
    with pytest.raises(AssertionError):  # ...so the Serve-level walk is what catches it
        check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))


def test_rayservice_wiring() -> None:
    from openlora_ray.serve.config import AppConfig

    doc = rayservice()
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    args = AppConfig.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"])
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    worker = _worker(doc)
    assert worker["minReplicas"] >= 1 and worker["maxReplicas"] == args.replicas.autoscaling["max_replicas"]
    for group in (head, worker):
        assert group["rayStartParams"].get("metrics-export-port") == "8080"
        container = group["template"]["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": 8080} in container["ports"]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert Path(mounts["api-keys"]) / "keys.yaml" == Path(args.auth.keys_file)
    gpu = worker["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" and args.replicas.num_gpus == 1


# --------------------------------------------------------------------- k8s: built-in kinds
@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the `test` extra) bundles the Kubernetes schemas")


BUILTIN_DOCS = [(p, d) for p, d in k8s_docs() if d["kind"] in BUILTIN_KINDS]


@pytest.mark.parametrize("path, doc", BUILTIN_DOCS, ids=[f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in BUILTIN_DOCS])
def test_builtin_kinds_validate(kubernetes_validate, path: Path, doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_ray_pod_templates_validate_as_kubernetes_pods(kubernetes_validate) -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": group["template"]}, K8S_VERSION, strict=True)


def test_builtin_validation_rejects_mistakes(kubernetes_validate) -> None:
    doc = copy.deepcopy(next(d for _, d in BUILTIN_DOCS if d["kind"] == "Deployment"))
    doc["spec"]["replica"] = doc["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_k8s_document_is_checked() -> None:
    kinds = {d["kind"] for _, d in k8s_docs()}
    assert kinds <= BUILTIN_KINDS | {"RayService", "RayCluster", "PodMonitor"}, kinds
    assert {"RayService", "PodMonitor", "Secret", "Job", "PersistentVolumeClaim", "Service", "Namespace"} <= kinds


# ------------------------------------------------------------------ k8s: PodMonitor, wiring
def test_podmonitor_scrapes_the_ray_metrics_port() -> None:
    monitors = [d for _, d in k8s_docs() if d["kind"] == "PodMonitor"]
    assert len(monitors) == 1
    pm = monitors[0]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["metadata"]["name"]
    spec = pm["spec"]
    assert set(spec) <= {"jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector", "sampleLimit", "targetLimit", "attachMetadata", "scrapeClass"}
    assert spec["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    endpoints = spec["podMetricsEndpoints"]
    assert endpoints and all(set(e) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings"} for e in endpoints)
    cluster = rayservice()["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        ports = {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert {e["port"] for e in endpoints} <= ports


def _secret_keys() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for _, d in k8s_docs() if d["kind"] == "Secret"}


def _pod_specs() -> Iterator[tuple[str, dict]]:
    for _, doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                yield doc["metadata"]["name"], group["template"]["spec"]


def test_k8s_references_resolve() -> None:
    secrets = _secret_keys()
    claims = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    for owner, spec in _pod_specs():
        for container in spec["containers"]:
            for ref in container.get("envFrom", []):
                assert ref["secretRef"]["name"] in secrets, owner
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (owner, ref)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (owner, mount)
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert "keys.yaml" in secrets["openlora-api-keys"]


def test_minio_serves_the_bucket_the_app_reads() -> None:
    from openlora_ray.serve.config import AppConfig
    from openlora_ray.store.uri import parse_store_uri

    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs()}
    service, deployment = docs[("Service", "minio")], docs[("Deployment", "minio")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert 9000 in {p["port"] for p in service["spec"]["ports"]}
    args = AppConfig.model_validate(yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"])
    bucket = parse_store_uri(args.store.uri).bucket
    assert args.store.addressing_style == "path"  # MinIO behind a plain Service name
    job = docs[("Job", "minio-create-bucket")]
    script = "\n".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert f"mc mb --ignore-existing store/{bucket}" in script
    assert job["spec"]["template"]["spec"]["containers"][0]["image"].startswith("minio/mc")


# ------------------------------------------------------------------------ k8s: kustomization
def test_kustomization_lists_exactly_the_manifests() -> None:
    kustomization = load(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_FILES)
    namespaces = [d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "Namespace"]
    assert namespaces == [kustomization["namespace"]]
    assert all("namespace" not in d["metadata"] for _, d in k8s_docs()), "the kustomization sets the namespace"


def test_kustomize_build() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the static kustomization check still ran")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    namespace = load(K8S / "kustomization.yaml")["namespace"]
    assert all(d["metadata"].get("namespace") == namespace for d in docs if d["kind"] != "Namespace")
    built = next(d for d in docs if d["kind"] == "RayService")
    assert crd_errors(built) == []
    images = {c["image"] for _, spec in [("", g["template"]["spec"]) for g in [built["spec"]["rayClusterConfig"]["headGroupSpec"], *built["spec"]["rayClusterConfig"]["workerGroupSpecs"]]] for c in spec["containers"]}
    assert all("/" in image and ":" in image for image in images), images  # the images: entry was applied


# ------------------------------------------------------------------------------ DEPLOY.md
def test_deploy_md_documents_every_setting() -> None:
    """DEPLOY.md's settings tables name every AppConfig field (a new field needs a line there)."""
    import re

    from openlora_ray.engine.config import EngineSettings
    from openlora_ray.serve.auth import AuthSettings
    from openlora_ray.serve.config import AppConfig, ReplicaSettings
    from openlora_ray.serve.limits import LimitSettings
    from openlora_ray.serve.routing import RouterSettings
    from openlora_ray.store.settings import StoreSettings

    text = (ROOT / "DEPLOY.md").read_text()
    missing = [
        f"{model.__name__}.{name}"
        for model in (AppConfig, EngineSettings, ReplicaSettings, StoreSettings, RouterSettings, AuthSettings, LimitSettings)
        for name in model.model_fields
        if not re.search(rf"`(\w+\.)?{re.escape(name)}`", text)
    ]
    assert missing == [], f"document these settings in DEPLOY.md section 5: {missing}"
