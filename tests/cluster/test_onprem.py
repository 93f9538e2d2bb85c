"""`ray up` and `serve deploy` for real: cluster/onprem-gpu.yaml on two loopback nodes, one lost.

The on-premise path end to end, on this machine: `ray up` (Ray's `local` provider, over SSH) of a
copy of cluster/onprem-gpu.yaml whose head is 127.0.0.2 and whose one worker is 127.0.0.3 (see
loopback_nodes.py for what makes them two servers), the head's autoscaler setting up the worker,
`serve deploy` of deployments/local-cpu.yaml (made two one-GPU replicas of a tiny random Llama,
with real PEFT adapters in a folder store) through the head's dashboard, completions through the
Serve HTTP proxy, the worker's `ray stop`, and `ray down`.

The copy changes only what one machine needs: the addresses, the SSH user and key, and flags
appended to the config's own `ray start` commands (later flags win): fake CPUs/GPUs (head 2 GPUs,
worker 1, so Serve can replace a lost replica on the head), a port of its own for every listener,
and a loopback-only dashboard.

Run by `make cluster-test` (marker `cluster`, deselected from `make test`); steps run in order and
share one cluster. Nothing here reaches an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from loopback_nodes import SSHD, LoopbackNodes
from peft_helpers import save_peft_adapter
from serve_helpers import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Not 127.0.0.1: `ray start --node-ip-address=127.0.0.1` (and a GCS address on it) is rewritten to
# the machine's outward address (ray/_private/services.py resolve_ip_for_localhost), so the head
# would register as e.g. 192.0.2.2: traffic off loopback, and the local provider (which knows the
# head by the IP in the config) would not recognise it. Any other 127.x address is kept as given.
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
RAYLET_SLOW = "The current node timed out during startup"  # ray/_private/node.py
CACHE = Path(".cache/openlora-ray/adapters")  # the Serve config's default cache_dir, under each node's ~
ADAPTERS = {
    "alpha": dict(r=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=71),
    "beta": dict(r=8, alpha=4.0, targets=("q_proj", "k_proj", "o_proj"), seed=72),
    "gamma": dict(r=2, alpha=6.0, targets=("gate_proj", "up_proj"), seed=73),
    "delta": dict(r=4, alpha=3.0, targets=("o_proj",), seed=74),
    "epsilon": dict(r=4, alpha=5.0, targets=("v_proj", "down_proj"), seed=75),
    "zeta": dict(r=2, alpha=3.0, targets=("k_proj",), seed=76),
}


class Cluster:
    """The nodes, the config copies and the commands run against them from "the laptop" (here)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        per_node = (
            "object-manager",
            "node-manager",
            "metrics-export",
            "dashboard-agent-listen",
            "dashboard-agent-grpc",
            "runtime-env-agent",
        )
        ports = iter(distinct_free_ports(5 + 2 * len(per_node)))
        self.nodes = LoopbackNodes(workdir, {"head": HEAD, "worker": WORKER}, port=next(ports))
        self.ports = {name: next(ports) for name in ("gcs", "dashboard", "client", "serve")}
        self.node_ports = {ip: {name: next(ports) for name in per_node} for ip in (HEAD, WORKER)}
        self.config = workdir / "onprem-loopback.yaml"
        self.up_log = ""
        self.is_down = False
        laptop = workdir / "laptop"
        laptop.mkdir()
        self.env = {
            **os.environ,
            "HOME": str(laptop),
            "TMPDIR": str(laptop),
            "RAY_TMPDIR": str(laptop),
            "PATH": f"{BIN}:{self.nodes.bin}:{os.environ['PATH']}",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
        }

    @property
    def dashboard(self) -> str:
        return f"http://{HEAD}:{self.ports['dashboard']}"

    @property
    def serve_url(self) -> str:
        return f"http://{HEAD}:{self.ports['serve']}"

    def start_flags(self, ip: str, num_gpus: int, worker_ports: tuple[int, int]) -> str:
        ports = self.node_ports[ip]
        flags = [f"--{name}-port={port}" for name, port in ports.items()]
        flags += [
            f"--node-ip-address={ip}",
            "--num-cpus=2",
            f"--num-gpus={num_gpus}",
            "--object-store-memory=200000000",
        ]
        flags += [f"--min-worker-port={worker_ports[0]}", f"--max-worker-port={worker_ports[1]}"]
        return " ".join(flags)

    def write_config(self, dist: Path, keys_file: Path) -> dict:
        """The loopback copy of cluster/onprem-gpu.yaml (see the module doc for what changes)."""
        config = yaml.safe_load((ROOT / "cluster" / "onprem-gpu.yaml").read_text())
        config["provider"].update(head_ip=HEAD, worker_ips=[WORKER])
        config["auth"] = {"ssh_user": "root", "ssh_private_key": str(self.nodes.key)}
        remote = {"dist": "~/openlora/dist", "keys": "~/openlora/keys.yaml"}
        assert set(config["file_mounts"]) == set(remote.values())
        config["file_mounts"] = {remote["dist"]: str(dist), remote["keys"]: str(keys_file)}
        head = (
            f"--port={self.ports['gcs']} --ray-client-server-port={self.ports['client']} --dashboard-host={HEAD} "
            f"--dashboard-port={self.ports['dashboard']} " + self.start_flags(HEAD, 2, (20100, 20400))
        )
        worker = f"--address={HEAD}:{self.ports['gcs']} " + self.start_flags(WORKER, 1, (20500, 20800))
        config["head_start_ray_commands"] = _append_to_ray_start(config["head_start_ray_commands"], head)
        config["worker_start_ray_commands"] = _append_to_ray_start(config["worker_start_ray_commands"], worker)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        return config

    def cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        command = [str(BIN / args[0]), *args[1:]]
        return subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.workdir, check=False
        )

    def nodes_state(self) -> dict[str, dict]:
        """node ip -> the state API's view of its newest node (ALIVE or DEAD, resources)."""
        r = requests.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 100, "detail": 1}, timeout=10)
        r.raise_for_status()
        by_ip: dict[str, dict] = {}
        for node in sorted(r.json()["data"]["result"]["result"], key=lambda n: n.get("start_time_ms") or 0):
            by_ip[node["node_ip"]] = node
        return by_ip

    def serve_app(self) -> dict:
        r = requests.get(f"{self.dashboard}/api/serve/applications/", timeout=10)
        r.raise_for_status()
        return r.json()["applications"].get("openlora", {})

    def running_replicas(self) -> dict[str, str]:
        """replica id -> node ip of the model replicas Serve reports RUNNING."""
        app = self.serve_app()
        replicas = app.get("deployments", {}).get("LoraReplica", {}).get("replicas", [])
        return {r["replica_id"]: r["node_ip"] for r in replicas if r["state"] == "RUNNING"}

    def router_replicas(self) -> dict[str, dict]:
        """GET /v1/replicas: the replicas the ingress's handle (its router) knows, and their state."""
        r = requests.get(f"{self.serve_url}/v1/replicas", timeout=30)
        assert r.status_code == 200, r.text
        return {d["replica_id"]: d for d in r.json()["data"]}

    def logs(self, lines: int = 40) -> str:
        """The tails of the autoscaler's logs, the raylets' errors and the Serve controller's log, for
        failure messages. Both nodes write there: a worker node takes its session folder from the head."""
        logs = self.nodes.nodes["head"].root / "t" / "ray" / "session_latest" / "logs"
        out = []
        for name in ("monitor.log", "monitor.out", "monitor.err", "raylet*.err", "serve/controller_*.log"):
            for path in sorted(logs.glob(name)):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return wait_for(predicate, timeout=timeout, interval=1)
        except AssertionError:
            raise AssertionError(f"{what} (not within {timeout}s)\n{self.logs()}") from None

    def down(self) -> subprocess.CompletedProcess:
        self.is_down = True
        return self.cli("ray", "down", "-y", "--log-color", "false", str(self.config), timeout=180)


def distinct_free_ports(n: int) -> list[int]:
    """``n`` different free ports: the sockets stay bound until all are chosen (Ray refuses two
    components on one port, and free ports picked one at a time can repeat)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _append_to_ray_start(commands: list[str], flags: str) -> list[str]:
    out = [c + " " + flags if "ray start" in c else c for c in commands]
    assert sum("ray start" in c for c in commands) == 1, commands
    return out


def _node_cache(home: Path, store_uri: str) -> set[str]:
    """The adapter ids a node's disk cache holds, read from its folder (not from the replica)."""
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    return set(AdapterStore(StoreSettings(uri=store_uri, cache_dir=home / CACHE)).cached_ids())


@pytest.fixture(scope="module")
def store(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder store with real PEFT adapters of the tiny chat model (the nodes share this disk)."""
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    root = tmp_path_factory.mktemp("cluster-store")
    (root / "adapters").mkdir()
    pusher = AdapterStore(StoreSettings(uri=str(root / "adapters"), cache_dir=root / "push-cache"))
    for name, spec in ADAPTERS.items():
        pusher.push(save_peft_adapter(tiny_chat_model_dir, root / "src" / name, **spec), f"{name}@v1")
    return root / "adapters"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as a wheel, built from a copy of the tree (a build in place would write build/
    into a checkout others may be using), offline: no build isolation, no index."""
    src = tmp_path_factory.mktemp("wheel-src")
    shutil.copytree(ROOT / "openlora_ray", src / "openlora_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert len(list(dist.glob("openlora_ray-*.whl"))) == 1
    return dist


@pytest.fixture(scope="module")
def cluster(wheel: Path) -> Iterator[Cluster]:
    """Two loopback nodes and `ray up`; on the way out `ray down` and every sshd stopped, whatever happened."""
    assert SSHD.exists() and shutil.which("rsync") and shutil.which("ssh"), (
        "make cluster-test installs openssh-server and rsync"
    )
    workdir = Path(tempfile.mkdtemp(prefix="olr-", dir="/tmp"))  # short: Ray's socket paths live under it
    c = Cluster(workdir)
    nodes = c.nodes
    try:
        nodes.start()
        keys = workdir / "keys.yaml"
        keys.write_text("[]\n")
        c.write_config(wheel, keys)
        for attempt in range(2):
            up = c.cli("ray", "up", "-y", "--no-config-cache", "--log-color", "false", str(c.config), timeout=240)
            c.up_log = up.stdout + up.stderr
            # `ray start` gives a raylet 30 s (hard-coded) to register; on a loaded machine it can
            # miss that. `ray up` again (its head commands begin with `ray stop`), once.
            if up.returncode == 0 or RAYLET_SLOW not in c.up_log or attempt:
                break
        assert up.returncode == 0, c.up_log[-6000:]
        yield c
    finally:
        try:
            if not c.is_down and (workdir / "laptop").exists():
                c.down()
        finally:
            nodes.stop()
            nodes.kill_leftovers()
            left = nodes.leftovers()
            shutil.rmtree(workdir, ignore_errors=True)
            assert not left, f"processes outlived the cluster test: {left}"


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, store: Path, tiny_chat_model_dir: Path) -> Cluster:
    """`serve deploy` of a config derived from deployments/local-cpu.yaml, through the head's dashboard."""
    cluster.wait(
        lambda: {ip for ip, n in cluster.nodes_state().items() if n["state"] == "ALIVE"} == {HEAD, WORKER},
        150,
        "two nodes alive",
    )
    config = copy.deepcopy(yaml.safe_load((ROOT / "deployments" / "local-cpu.yaml").read_text()))
    # The proxy (HeadOnly, as in the local file) on the head's address: "the laptop" reaches it there.
    config["http_options"].update(host=HEAD, port=cluster.ports["serve"])
    app = config["applications"][0]
    app["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] = "1"
    args = app["args"]
    args["model"] = str(tiny_chat_model_dir)
    args["served_model_name"] = "tiny"
    args["engine"].update(num_slots=4, max_rank=8, max_running=4, max_seq_len=256)
    args["store"]["uri"] = str(store)  # cache_dir stays the default: ~/.cache/... of each node
    args["replicas"].update(num_replicas=2, num_gpus=1)  # one per (fake) GPU, as on a GPU cluster
    path = cluster.workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = cluster.cli("serve", "deploy", str(path), "-a", cluster.dashboard, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    cluster.wait(
        lambda: cluster.serve_app().get("status") == "RUNNING" and len(cluster.running_replicas()) == 2,
        180,
        "the Serve app running",
    )
    return cluster


def complete(url: str, adapter: str, max_tokens: int = 4) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(
        model=adapter, prompt=f"Hello from {adapter}", max_tokens=max_tokens, temperature=0
    )
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
    return out.choices[0].text


# ---------------------------------------------------------------------------------------------- steps
def test_ray_up_starts_the_head_and_its_autoscaler_adds_the_worker(cluster: Cluster) -> None:
    assert "Ray runtime started" in cluster.up_log
    nodes = cluster.wait(
        lambda: (
            (s := cluster.nodes_state())
            and {ip for ip, n in s.items() if n["state"] == "ALIVE"} == {HEAD, WORKER}
            and s
        ),
        150,
        "two nodes alive",
    )
    assert nodes[HEAD]["is_head_node"] and not nodes[WORKER]["is_head_node"]
    assert nodes[HEAD]["resources_total"]["GPU"] == 2 and nodes[WORKER]["resources_total"]["GPU"] == 1
    for name, ip in (("head", HEAD), ("worker", WORKER)):
        # The config's setup commands installed the wheel into each node's Python.
        where = cluster.nodes.ssh(
            name, "python -c 'import openlora_ray; print(openlora_ray.__file__)'", timeout=60
        ).stdout
        assert where.strip().startswith(str(cluster.nodes.nodes[name].venv)), where
        # ...and its `ray start` exports metrics (the flag the config sets, on a port of its own here).
        url = f"http://{ip}:{cluster.node_ports[ip]['metrics-export']}/metrics"
        text = cluster.wait(lambda url=url: _get_text(url), 60, f"metrics of {ip}")
        assert "ray_" in text


def test_serve_deploy_puts_one_replica_on_each_node(deployed: Cluster) -> None:
    replicas = deployed.running_replicas()
    assert sorted(replicas.values()) == [HEAD, WORKER], replicas
    assert set(deployed.router_replicas()) == set(replicas)


def test_completions_for_several_adapters_fill_each_nodes_own_cache(deployed: Cluster, store: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda a: complete(deployed.serve_url, a), [*ADAPTERS, *ADAPTERS]))
    assert len(answers) == 2 * len(ADAPTERS) and all(isinstance(a, str) for a in answers)
    # One adapter on both replicas (the admin prefetch): each node downloads it into its own cache.
    r = requests.post(f"{deployed.serve_url}/v1/adapters/alpha/prefetch", json={"replicas": 2}, timeout=60)
    assert r.status_code == 200 and len(r.json()["replicas"]) == 2, r.text
    node_of = deployed.running_replicas()
    homes = {ip: deployed.nodes.nodes[name].home for name, ip in (("head", HEAD), ("worker", WORKER))}
    caches = {ip: _node_cache(homes[ip], str(store)) for ip in homes}
    assert all("alpha@v1" in ids for ids in caches.values()), caches
    assert set().union(*caches.values()) == {f"{a}@v1" for a in ADAPTERS}, caches

    # What each replica reports to the routers is its own node's folder.
    def reported() -> bool:
        view = deployed.router_replicas()
        return all(set(view[rid]["disk"]) == caches[ip] for rid, ip in node_of.items())

    deployed.wait(reported, 30, "each replica reporting its node's cache")


def test_losing_the_worker_node_keeps_requests_answered(deployed: Cluster) -> None:
    before = deployed.running_replicas()
    lost = {rid for rid, ip in before.items() if ip == WORKER}
    assert len(lost) == 1
    outcomes: list[tuple[float, bool]] = []
    stop = threading.Event()

    def traffic() -> None:
        names = list(ADAPTERS)
        i = 0
        while not stop.is_set():
            try:
                complete(deployed.serve_url, names[i % len(names)], max_tokens=2)
                outcomes.append((time.monotonic(), True))
            except Exception:  # noqa: BLE001 - counted: the failover window is what we measure
                outcomes.append((time.monotonic(), False))
                time.sleep(0.2)
            i += 1

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        time.sleep(2)
        t0 = time.monotonic()
        # The config's own stop command, run on the worker node (only its processes: its namespace).
        deployed.nodes.ssh("worker", "ray stop", timeout=60)
        assert not [c for c in deployed.nodes.processes("worker").values() if "raylet" in c or "default_worker" in c]
        deployed.wait(lambda: deployed.nodes_state()[WORKER]["state"] == "DEAD", 60, "the worker node dead")
        # The ingress's router forgets the lost replica; Serve starts a replacement where it fits.
        deployed.wait(lambda: not lost & set(deployed.router_replicas()), 90, "the router forgetting the lost replica")
        after = deployed.wait(
            lambda: (r := deployed.running_replicas()) and len(r) == 2 and not lost & set(r) and r,
            120,
            "a replacement replica",
        )
        assert set(deployed.router_replicas()) == set(after)
        recovered = time.monotonic() - t0
    finally:
        stop.set()
        thread.join(timeout=90)
    for adapter in ADAPTERS:
        complete(deployed.serve_url, adapter)
    during = [ok for t, ok in outcomes if t >= t0]
    assert during and during[-5:] == [True] * 5, outcomes[-10:]
    failed = during.count(False)
    print(
        f"\nworker lost: {len(during)} requests during failover, {failed} failed; "
        f"replacement running after {recovered:.1f}s on {sorted(after.values())}"
    )


def test_ray_down_stops_every_node(cluster: Cluster) -> None:
    done = cluster.down()
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("head", "worker"):
        cluster.wait(lambda name=name: not _ray_processes(cluster, name), 30, f"no Ray process left on {name}")


def _ray_processes(cluster: Cluster, name: str) -> list[str]:
    names = ("raylet", "gcs_server", "default_worker", "dashboard", "monitor.py", "log_monitor")
    return [c for c in cluster.nodes.processes(name).values() if any(n in c for n in names)]


def _get_text(url: str) -> str:
    try:
        r = requests.get(url, timeout=5)
    except requests.ConnectionError:
        return ""
    return r.text if r.status_code == 200 else ""
