"""Profiles and the seeded schedule of faults: the same seed, the same faults at the same times."""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Faults on any broker; each takes a resource, so faults of different resources overlap.
SINGLE_NODE_FAULTS = (
    "pool_kill",  # a worker's pool process, SIGKILL
    "worker_kill",  # a whole worker, SIGKILL, replaced (then a job cancelled at once)
    "caller_kill",  # a caller, SIGKILL, its jobs rescued by a new process with the ids alone
    "broker_restart",  # stop_app / start_app
    "connections_closed",  # every connection closed by the broker
    "proxy_freeze",  # the callers' TCP proxy stopped (half-open) for a while
    "proxy_reset",  # the callers' TCP proxy killed (RST) and started again
    "redis_restart",  # Redis shut down (its append-only file kept) and started again
    "redis_hang",  # Redis SIGSTOPped: connections accepted, nothing answered
    "memory_alarm",  # the broker's memory high watermark set tiny, then back
    "management_down",  # the management API out of reach of the audit
)
#: On the three-node cluster, in addition.
CLUSTER_FAULTS = ("node_stop", "node_kill")

#: Which resource each fault holds while it lasts.
RESOURCE = {
    "pool_kill": "workers",
    "worker_kill": "workers",
    "caller_kill": "callers",
    "broker_restart": "broker",
    "node_stop": "broker",
    "node_kill": "broker",
    "memory_alarm": "broker",
    "connections_closed": "connections",
    "proxy_freeze": "proxy",
    "proxy_reset": "proxy",
    "redis_restart": "redis",
    "redis_hang": "redis",
    "management_down": "management",
}


@dataclass(frozen=True)
class Profile:
    name: str
    #: Seconds of submits and faults; callers then wait for what they hold.
    duration: float
    #: Seconds between two faults' starts (uniform in this range).
    fault_gap: tuple[float, float]
    sync_callers: int
    async_callers: int
    workers: int
    nodes: int
    faults: tuple[str, ...]
    #: The jobs' TTL: long enough to outlast every fault, short enough to see queues expire.
    ttl: float


PROFILES = {
    "short": Profile(
        name="short",
        duration=100.0,
        fault_gap=(5.0, 9.0),
        sync_callers=2,
        async_callers=2,
        workers=2,
        nodes=1,
        faults=SINGLE_NODE_FAULTS,
        ttl=45.0,
    ),
    "long": Profile(
        name="long",
        duration=1800.0,
        fault_gap=(5.0, 9.0),
        sync_callers=2,
        async_callers=2,
        workers=3,
        nodes=3,
        faults=SINGLE_NODE_FAULTS + CLUSTER_FAULTS,
        ttl=90.0,
    ),
}


@dataclass(frozen=True)
class Fault:
    #: Seconds after the run's start.
    at: float
    kind: str
    #: Picks among the fault's possible targets (a worker, a caller, a node): ``pick % len``.
    pick: int
    #: How long the fault lasts (a freeze, a hang, an alarm, a node down), in seconds.
    hold: float


def plan(seed: int, profile: Profile) -> list[Fault]:
    """The run's faults, in order: every kind at least once when the run is long enough."""
    rng = random.Random(seed)
    kinds = list(profile.faults)
    rng.shuffle(kinds)
    faults: list[Fault] = []
    at = rng.uniform(*profile.fault_gap)
    while at < profile.duration - 5:
        kind = kinds[len(faults)] if len(faults) < len(kinds) else rng.choice(profile.faults)
        faults.append(Fault(round(at, 2), kind, rng.randrange(1 << 30), round(rng.uniform(2.0, 8.0), 2)))
        at += rng.uniform(*profile.fault_gap)
    return faults
