"""``openlora-ray bench routing-sim --decision-time``: the cost of one routing decision at scale.

Issue 16's target 2 is a decision in at most 0.2 ms at 1,000 replicas. The simulator's own
timings include its queue-length lookups and run interleaved with the simulation, so this
measures the policy alone: ``RoutingIndex.rank`` on a steady-state cluster view, with the inputs a
Serve router passes (a popularity record, recent sends, queue lengths for the replicas it sent to,
the adapters in flight per replica), for a stream of requests drawn from the same Zipf popularity
that filled the slots: hot adapters, which have the most holders and so cost the most, are asked
for most. The O(replicas) reference ``rank_replicas`` is timed on a few of the same decisions.

The view: every adapter gets slot copies in proportion to its share of the traffic (the top
adapter of Zipf(1.0) over 100,000 adapters, about 8 % of requests, gets about 100: what the
at-scale simulation ends with), the rest of the slots go to single copies drawn from the
popularity; each replica's host tier holds its slots plus more popular adapters; running, queued
and free KV blocks are random around 70 % utilisation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from openlora_ray.serve.router_memory import Popularity, RecentSends
from openlora_ray.serve.routing import RouterSettings, RoutingInputs, rank_replicas
from openlora_ray.serve.routing_index import RoutingIndex
from openlora_ray.serve.state import ReplicaState

KV_BLOCKS = 4096
REFERENCE_DECISIONS = 5


@dataclass(frozen=True)
class DecisionTimes:
    decisions: int
    median_us: float
    p99_us: float
    mean_us: float
    cpu_median_us: float  # the decision's own CPU time (thread time): without the waits for a core
    cpu_p99_us: float     # on a shared machine, which wall-clock p99 includes
    reference_median_us: float
    holders_mean: float  # slot holders of the requested adapter, averaged over the decisions


def steady_state(
    replicas: int, slots: int, adapters: int, zipf: float, *, host_slots: int, seed: int
) -> list[ReplicaState]:
    """A plausible steady-state view of the cluster (see the module doc)."""
    rng = np.random.default_rng(seed)
    share = 1.0 / np.arange(1, adapters + 1, dtype=np.float64) ** zipf
    share /= share.sum()
    resident: list[set[int]] = [set() for _ in range(replicas)]
    free = list(range(replicas))
    for a in range(adapters):
        copies = max(1, round(share[a] * replicas * 1.2))
        if copies == 1:
            break
        for r in rng.choice(free, size=min(copies, len(free)), replace=False).tolist():
            resident[r].add(a)
        free = [r for r in free if len(resident[r]) < slots]
    first_single = a
    needed = replicas * slots - sum(map(len, resident))
    tail = share[first_single:] / share[first_single:].sum()
    singles = iter((first_single + rng.choice(adapters - first_single, size=needed, replace=False, p=tail)).tolist())
    for r in range(replicas):
        while len(resident[r]) < slots:
            resident[r].add(next(singles))
    draws = iter(rng.choice(adapters, size=replicas * host_slots * 4, p=share).tolist())
    states = []
    for r in range(replicas):
        host = set(resident[r])
        while len(host) < host_slots:
            host.add(next(draws))
        running = int(rng.binomial(8, 0.7))
        states.append(
            ReplicaState(
                f"replica-{r:04d}",
                resident=frozenset(f"adapter-{a}" for a in resident[r]),
                host=frozenset(f"adapter-{a}" for a in host),
                num_slots=slots,
                free_slots=0,
                running=running,
                queued=int(rng.integers(0, 3)) if running == 8 else 0,
                max_running=8,
                free_kv_blocks=int(rng.integers(0, KV_BLOCKS)),
                total_kv_blocks=KV_BLOCKS,
            )
        )
    return states


def measure(
    *,
    replicas: int = 1000,
    slots: int = 16,
    adapters: int = 100_000,
    zipf: float = 1.0,
    decisions: int = 20_000,
    seed: int = 0,
) -> DecisionTimes:
    """Time ``decisions`` calls of ``RoutingIndex.rank`` as one router makes them (see the module doc)."""
    settings = RouterSettings()
    states = steady_state(replicas, slots, adapters, zipf, host_slots=64, seed=seed)
    index = RoutingIndex()
    index.set_replicas([s.replica_id for s in states])
    for state in states:
        index.update(state)
    rng = np.random.default_rng(seed + 1)
    share = 1.0 / np.arange(1, adapters + 1, dtype=np.float64) ** zipf
    share /= share.sum()
    stream = [f"adapter-{a}" for a in rng.choice(adapters, size=decisions, p=share).tolist()]
    popularity = Popularity(settings.popularity_half_life_s)
    recent = RecentSends(settings.recent_ttl_s)
    # One router of four sees a quarter of ~1,100 requests/s: its queue lengths are fresh for the
    # replicas it sent to in the last second (~280), its requests in flight pin slots on most replicas.
    queue_lens = {s.replica_id: s.running + s.queued for s in states[: replicas * 28 // 100]}
    in_flight = {s.replica_id: frozenset(sorted(s.resident)[: s.running // 2]) for s in states}
    times: list[float] = []
    cpu_times: list[float] = []
    holders = 0
    now = 0.0
    for adapter in stream:
        now += 4.0 / 1100  # this router's arrival spacing
        popularity.record(adapter, now)
        inputs = RoutingInputs(
            recent=recent.replicas_for(adapter, now),
            queue_lens=queue_lens,
            in_flight=in_flight,
            popularity=popularity,
            now=now,
            draw=int(rng.integers(1 << 32)),
        )
        started, cpu_started = time.perf_counter(), time.thread_time()
        ranks = index.rank(adapter, settings, inputs)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.thread_time() - cpu_started)
        recent.record(adapter, ranks[0][0], now)
        holders += len(index.slot_holders(adapter))
    reference = []
    for adapter in stream[:REFERENCE_DECISIONS]:
        inputs = RoutingInputs(queue_lens=queue_lens, in_flight=in_flight, popularity=popularity, now=now)
        started = time.perf_counter()
        rank_replicas(adapter, states, settings, inputs)
        reference.append(time.perf_counter() - started)
    us, cpu_us = np.array(times) * 1e6, np.array(cpu_times) * 1e6
    return DecisionTimes(
        decisions=decisions,
        median_us=float(np.median(us)),
        p99_us=float(np.percentile(us, 99)),
        mean_us=float(us.mean()),
        cpu_median_us=float(np.median(cpu_us)),
        cpu_p99_us=float(np.percentile(cpu_us, 99)),
        reference_median_us=statistics.median(reference) * 1e6,
        holders_mean=holders / decisions,
    )


def run_decision_time(args: argparse.Namespace) -> int:
    """The ``--decision-time`` mode of ``bench routing-sim``: prints the CPU model, the machine's
    load average (a shared machine inflates the figures), median and p99; writes JSON."""
    from openlora_ray.bench.timing import cpu_model, print_table, write_json

    load_before = os.getloadavg()[0]
    result = measure(
        replicas=args.replicas, slots=args.slots, adapters=args.adapters, zipf=args.zipf,
        decisions=args.decisions, seed=args.seed,
    )
    load_after = os.getloadavg()[0]
    print(f"CPU: {cpu_model()}; load average {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} CPUs)")
    print_table(
        ["replicas", "decisions", "median us", "p99 us", "mean us", "CPU median us", "CPU p99 us",
         "reference median us", "slot holders (mean)"],
        [[args.replicas, result.decisions, result.median_us, result.p99_us, result.mean_us, result.cpu_median_us,
          result.cpu_p99_us, result.reference_median_us, result.holders_mean]],
    )
    write_json(args.out, {"cpu": cpu_model(), "load_average": [load_before, load_after], "replicas": args.replicas,
                          "slots": args.slots, "adapters": args.adapters, "zipf": args.zipf, **asdict(result)})
    return 0
