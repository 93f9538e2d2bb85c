"""``LoraAffinityRouter`` as Serve drives it, without a cluster: fake replicas, router built in-loop.

The fake replica mirrors ``ray.serve._private.test_utils.FakeRunningReplica`` (same knobs:
``set_queue_len_response``, ``model_ids``, ``max_ongoing_requests``) plus ``routing_stats``. It is
not imported from there because that module imports httpx, grpc and starlette at the top, and
httpx is not a dependency of this project (the openai client we test with brings httpx2).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from openlora_ray.serve.router import REFRESH_S, LoraAffinityRouter
from openlora_ray.serve.routing import RouterSettings
from openlora_ray.serve.state import ReplicaState


class StatsReplica(RunningReplica):
    """A replica as the router sees it: id, stats, multiplexed ids, and a scripted queue length."""

    def __init__(self, unique_id: str, stats: dict[str, Any] | None = None, *, model_ids: set[str] | None = None, max_ongoing_requests: int = 10) -> None:
        self._replica_id = ReplicaID(unique_id=unique_id, deployment_id=DeploymentID(name="LLM", app_name="lora"))
        self.stats = stats or {}
        self._model_ids = model_ids or set()
        self._max_ongoing = max_ongoing_requests
        self._queue_len = 0
        self._has_queue_len = asyncio.Event()

    replica_id = property(lambda self: self._replica_id)
    node_id = property(lambda self: "")
    availability_zone = property(lambda self: None)
    multiplexed_model_ids = property(lambda self: self._model_ids)
    routing_stats = property(lambda self: self.stats)
    max_ongoing_requests = property(lambda self: self._max_ongoing)
    is_cross_language = property(lambda self: False)

    def set_queue_len_response(self, queue_len: int) -> None:
        self._queue_len = queue_len
        self._has_queue_len.set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        await self._has_queue_len.wait()
        return self._queue_len


def stats(replica_id: str, *, resident=(), host=(), running=0, queued=0, free_vram_mb=8192) -> dict[str, Any]:
    return ReplicaState(
        replica_id,
        resident=frozenset(resident),
        host=frozenset(host),
        num_slots=4,
        free_slots=4 - len(resident),
        free_vram_mb=free_vram_mb,
        running=running,
        queued=queued,
        max_running=4,
    ).to_stats()


def request(adapter: str = "") -> PendingRequest:
    rid = str(uuid.uuid4())
    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id=rid, internal_request_id=rid, multiplexed_model_id=adapter))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_router(**settings: Any) -> LoraAffinityRouter:
    """Must run inside the event loop: the base class binds to the running loop."""
    # Serve enables the queue-length cache outside Ray Client (default_impl: strict max_ongoing).
    router = LoraAffinityRouter(
        deployment_id=DeploymentID(name="LLM", app_name="lora"),
        handle_source=DeploymentHandleSource.REPLICA,
        use_replica_queue_len_cache=True,
    )
    router.initialize_state(**RouterSettings(**settings).model_dump())
    router.clock = FakeClock()
    # Fake probes answer at once, but a loaded CI machine can take longer than Serve's 0.1 s
    # default deadline, and a probe that misses it reads as "skip this replica".
    router.queue_len_response_deadline_s = 5.0
    return router


def ids(ranks: list[list[RunningReplica]]) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


async def test_holder_first_and_should_backoff_set() -> None:
    router = make_router()
    a = StatsReplica("a", stats("a", resident=["x"]))
    b = StatsReplica("b", stats("b"))
    router.update_replicas([a, b])
    pr = request("x")
    ranks = await router.choose_replicas([a, b], pr)
    assert ids(ranks) == [["a"], ["b"]]
    assert pr.routing_context.should_backoff is True


async def test_base_model_one_rank_and_cold_adapter_most_free_vram() -> None:
    router = make_router()
    reps = [StatsReplica(n, stats(n, free_vram_mb=v)) for n, v in (("a", 2048), ("b", 16384), ("c", 4096))]
    router.update_replicas(reps)
    assert ids(await router.choose_replicas(reps, request(""))) == [["a", "b", "c"]]
    assert ids(await router.choose_replicas(reps, request("cold"))) == [["b"], ["c"], ["a"]]


async def test_replica_without_stats_and_multiplexed_ids_count_as_loading() -> None:
    router = make_router()
    a = StatsReplica("a", stats("a", host=["x"]))
    b = StatsReplica("b", model_ids={"x"})  # no stats yet, but Serve's multiplexing says x is loading there
    router.update_replicas([a, b])
    assert ids(await router.choose_replicas([a, b], request("x"))) == [["b"], ["a"]]


async def test_on_request_routed_makes_the_next_request_follow_the_cold_load() -> None:
    router = make_router(recent_ttl_s=4.0)
    reps = [StatsReplica(n, stats(n)) for n in "abcd"]
    router.update_replicas(reps)
    first = (await router.choose_replicas(reps, request("x")))[0][0]
    router.on_request_routed(request("x"), first.replica_id, result=None)
    # New stats arrive for another replica (more free VRAM); the loading one has not reported x yet.
    other = next(r for r in reps if r is not first)
    other.stats = stats(other.replica_id.unique_id, free_vram_mb=65536)
    assert (await router.choose_replicas(reps, request("x")))[0] == [first]
    router.clock.now += 5.0  # past the TTL: the stale view decides again
    assert (await router.choose_replicas(reps, request("x")))[0] == [other]


async def test_a_cold_placement_counts_as_loading_before_serve_reports_it_routed() -> None:
    """Serve bumps its queue-length cache as it sends but calls ``on_request_routed`` only after the
    replica accepts: a second request for the cold adapter ranked in between must follow the first."""
    router = make_router()
    reps = [StatsReplica(n, stats(n)) for n in "ab"]
    router.update_replicas(reps)
    first = (await router.choose_replicas(reps, request("x")))[0][0]
    router.on_send_request(first.replica_id)  # Serve bumps its queue-length cache: 1/4 busier
    assert (await router.choose_replicas(reps, request("x")))[0] == [first]
    # Without the claim the busier replica loses the cold placement (another adapter shows it):
    other_first = next(r for r in reps if r is not first)
    assert (await router.choose_replicas(reps, request("y")))[0] == [other_first]


async def test_a_claim_is_withdrawn_when_serve_routes_the_request_elsewhere_and_expires() -> None:
    router = make_router(recent_ttl_s=4.0)
    reps = [StatsReplica(n, stats(n)) for n in "ab"]
    router.update_replicas(reps)
    pr = request("x")
    first, second = (rank[0] for rank in await router.choose_replicas(reps, pr))
    assert router._recent.replicas_for("x", router.clock()) == {first.replica_id.unique_id}
    router.on_request_routed(pr, second.replica_id, result=None)  # the first choice was full
    assert router._recent.replicas_for("x", router.clock()) == {second.replica_id.unique_id}
    assert not router._claims
    await router.choose_replicas(reps, request("y"))  # a request cancelled before routing...
    router.clock.now += 5.0
    await router.choose_replicas(reps, request("z"))  # ...leaves a claim that expires with the TTL
    assert [c.adapter_id for c in router._claims.values()] == ["z"]


async def test_a_replica_whose_slots_serve_other_adapters_waits_until_one_completes() -> None:
    """The router counts its own requests in flight: routed adds, completed removes. a has x in its
    host tier, but its 4 slots are pinned by 4 other adapters' requests: b goes first until one ends."""
    router = make_router()
    a = StatsReplica("a", stats("a", host=["x"]))
    b = StatsReplica("b", stats("b"))
    router.update_replicas([a, b])
    others = [request(f"o{i}") for i in range(4)]
    for pr in others:
        router.on_request_routed(pr, a.replica_id, result=None)
    router.on_request_routed(request(""), a.replica_id, result=None)  # the base model takes no slot
    assert ids(await router.choose_replicas([a, b], request("x"))) == [["b"], ["a"]]
    router.on_request_completed(a.replica_id, others[0].metadata.internal_request_id)
    router.clock.now += 5.0  # the claim the first ranking made on b has expired (nothing was sent)
    assert ids(await router.choose_replicas([a, b], request("x"))) == [["a"], ["b"]]


async def test_spill_when_the_holder_is_past_the_threshold() -> None:
    router = make_router(spill_load=0.75)
    a = StatsReplica("a", stats("a", resident=["x"], running=3))  # 3/4
    b = StatsReplica("b", stats("b", running=1))
    router.update_replicas([a, b])
    assert ids(await router.choose_replicas([a, b], request("x"))) == [["b"], ["a"]]


async def test_serves_queue_length_cache_is_the_load_that_decides_the_spill() -> None:
    router = make_router(spill_load=1.0)
    a = StatsReplica("a", stats("a", resident=["x"], running=1))  # stats: 1/4, not busy
    b = StatsReplica("b", stats("b"))
    router.update_replicas([a, b])
    assert ids(await router.choose_replicas([a, b], request("x")))[0] == ["a"]
    router.on_new_queue_len_info(a.replica_id, 4)  # a's answer to this router's send: 4 ongoing now
    assert ids(await router.choose_replicas([a, b], request("x"))) == [["b"], ["a"]]
    router.clock.now += 1.5  # past queue_len_trust_s without a send: the cache may have drifted
    assert ids(await router.choose_replicas([a, b], request("x")))[0] == ["a"]  # the stats decide again


async def test_parsed_states_are_cached_until_serve_hands_over_new_stats() -> None:
    router = make_router()
    a = StatsReplica("a", stats("a"))
    router.update_replicas([a])
    await router.choose_replicas([a], request("x"))
    cached = router._states["a"].state
    await router.choose_replicas([a], request("y"))
    assert router._states["a"].state is cached
    a.stats = stats("a", resident=["y"])
    await router.choose_replicas([a], request("y"))
    assert router._states["a"].state is cached  # read again at most every REFRESH_S
    router.clock.now += 2 * REFRESH_S
    await router.choose_replicas([a], request("y"))
    assert router._states["a"].state.resident == {"y"}
    assert router._index.holders("y") == {"a"}


async def test_dead_and_removed_replicas_are_forgotten() -> None:
    router = make_router()
    a, b = StatsReplica("a", stats("a")), StatsReplica("b", stats("b"))
    router.update_replicas([a, b])
    first, other = (rank[0] for rank in await router.choose_replicas([a, b], request("x")))  # claims x on first
    router.on_request_routed(request("x"), first.replica_id, result=None)
    router.on_request_routed(request("y"), other.replica_id, result=None)
    router.on_replica_actor_died(other.replica_id)
    assert set(router._states) == {first.replica_id.unique_id} and len(router._recent) == 1
    router.update_replicas([])
    assert router._states == {} and len(router._recent) == 0


async def test_full_selection_path_picks_the_holder_then_falls_back_when_it_is_full() -> None:
    """Serve's own loop: ranks -> queue-length probes -> lowest queue below max_ongoing_requests."""
    router = make_router()
    holder = StatsReplica("holder", stats("holder", resident=["x"]), max_ongoing_requests=4)
    others = [StatsReplica(n, stats(n), max_ongoing_requests=4) for n in ("b", "c")]
    for r in (holder, *others):
        r.set_queue_len_response(0)
    router.update_replicas([holder, *others])
    ranks = ids(await router.choose_replicas([holder, *others], request("x")))
    assert ranks[0] == ["holder"]
    chosen = await asyncio.wait_for(router._choose_replica_for_request(request("x")), 5)
    assert chosen is holder
    holder.set_queue_len_response(4)  # full: Serve moves on to the next rank, the best non-holder
    router.replica_queue_len_cache.invalidate_key(holder.replica_id)
    chosen = await asyncio.wait_for(router._choose_replica_for_request(request("x")), 5)
    assert chosen.replica_id.unique_id == ranks[1][0]


async def test_two_routers_same_view_converge_on_a_cold_adapter() -> None:
    views = [[StatsReplica(n, stats(n, running=i % 2)) for i, n in enumerate("abcdefgh")] for _ in range(2)]
    routers = [make_router(), make_router()]
    for router, view in zip(routers, views):
        router.update_replicas(view)
    for k in range(20):
        picks = set()
        for router, view in zip(routers, views):
            for r in view:
                r.set_queue_len_response(0)
            chosen = await asyncio.wait_for(router._choose_replica_for_request(request(f"cold-{k}")), 5)
            picks.add(chosen.replica_id.unique_id)
        assert len(picks) == 1


def test_request_router_config_accepts_the_class_path_and_settings() -> None:
    cfg = RequestRouterConfig(
        request_router_class="openlora_ray.serve.router:LoraAffinityRouter",
        request_router_kwargs=RouterSettings(spill_load=0.8).model_dump(),
        request_routing_stats_period_s=2,
    )
    assert cfg.request_router_kwargs["spill_load"] == 0.8
    assert cfg.get_request_router_class() is LoraAffinityRouter


@pytest.mark.parametrize("bad", [{"spill_load": -1}, {"unknown": 1}])
async def test_bad_settings_fail_at_initialize_state(bad: dict[str, Any]) -> None:
    router = LoraAffinityRouter(deployment_id=DeploymentID(name="LLM", app_name="lora"), handle_source=DeploymentHandleSource.REPLICA)
    with pytest.raises(ValueError):
        router.initialize_state(**bad)
