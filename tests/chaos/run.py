"""Run a chaos profile: ``python -m tests.chaos.run --profile short|long --seed N [--dir D]``.

Prints the schedule, then one figure line (``chaos: seed=… jobs=… faults={…} … violations=V``),
and exits 1 on any violation, naming the seed to replay. The run's directory keeps the history
(``history.jsonl``), the final state (``final.json``) and every process's log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import requests

from ebb import contract
from ebb.records import job_key
from tests.chaos import checker
from tests.chaos import history as chaos_history
from tests.chaos.caller import WAIT_PHASE
from tests.chaos.faults import INJECTORS, all_up
from tests.chaos.history import History
from tests.chaos.schedule import PROFILES, RESOURCE, Fault, Profile, plan
from tests.chaos.world import World, wait_ready
from tests.support import wait_until

#: After the callers are done: the jobs' TTL, the audit's confirmation (12 s) and two audits.
END_SLACK = 25.0


def run(profile: Profile, seed: int, directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    schedule = plan(seed, profile)
    print(
        f"chaos: profile={profile.name} seed={seed} dir={directory} faults planned={len(schedule)}",
        flush=True,
    )
    for fault in schedule:
        print(f"  t={fault.at:6.1f} {fault.kind} pick={fault.pick} hold={fault.hold}", flush=True)
    world = World(directory, profile, seed)
    h = History(directory / "history.jsonl", "harness")
    try:
        world.start_servers()
        broker = _broker_version(world)
        h.record("run_start", seed=seed, profile=profile.name, broker=broker)
        for _ in range(profile.workers):
            world.start_worker()
        if not all(wait_ready(w, 90) for w in world.workers):
            raise RuntimeError("a worker did not become ready: see its log in " + str(directory))
        world.start_beat()
        start = time.time()
        world.until = start + profile.duration
        rng = random.Random(seed)
        for i in range(profile.sync_callers + profile.async_callers):
            client = "sync" if i < profile.sync_callers else "async"
            world.start_caller(f"caller-{i + 1}", client, i, world.until, [])
            time.sleep(rng.uniform(0, 0.5))
        _inject(world, schedule, start, h)
        assert wait_until(lambda: all_up(world), 120), "the broker, Redis or a proxy did not come back"
        callers_done = wait_until(lambda: not world.live_callers(), WAIT_PHASE + 60)
        h.record("callers_done", all_done=callers_done, still_running=world.live_callers())
        last = time.time()
        # Let what nobody consumed expire (TTL) and the audit see it go.
        time.sleep(max(0.0, profile.ttl + END_SLACK - (time.time() - last)))
        final = _final_state(world, seed, profile, broker)
    finally:
        world.stop_all()
    (directory / "final.json").write_text(json.dumps(final, indent=1))
    return checker.main([str(directory / "history.jsonl"), str(directory / "final.json")])


def _inject(world: World, schedule: list[Fault], start: float, h: History) -> None:
    """Each fault in a thread of its own, one at a time per resource: faults of different
    resources overlap (a broker restart while a worker is replaced and a caller is rescued)."""
    locks = {name: threading.Lock() for name in set(RESOURCE.values())}
    threads = []

    def apply(fault: Fault) -> None:
        with locks[RESOURCE[fault.kind]]:
            h.record("fault", kind=fault.kind, at=fault.at, pick=fault.pick, hold=fault.hold)
            try:
                done = INJECTORS[fault.kind](world, fault, h)
            except Exception as exc:
                done = {"harness_error": repr(exc), "trace": traceback.format_exc()[-800:]}
            h.record("fault_end", kind=fault.kind, **done)
            print(f"  fault t={time.time() - start:6.1f} {fault.kind}: {done}", flush=True)

    for fault in schedule:
        time.sleep(max(0.0, start + fault.at - time.time()))
        thread = threading.Thread(target=apply, args=(fault,), name=fault.kind, daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(300)


def _broker_version(world: World) -> str:
    node = world.cluster.node(1)
    overview = requests.get(f"{node.management_url}/api/overview", auth=("guest", "guest"), timeout=10).json()
    return str(overview.get("rabbitmq_version"))


def _final_state(world: World, seed: int, profile: Profile, broker: str) -> dict[str, Any]:
    node = world.cluster.node(1)
    listing = requests.get(
        f"{node.management_url}/api/queues",
        params={"columns": "name,arguments,consumers,messages,node"},
        auth=("guest", "guest"),
        timeout=30,
    ).json()
    queues = [q for q in listing if contract.parse_queue_name(q["name"]) is not None]
    events = chaos_history.read(world.directory / "history.jsonl")
    jobs = {
        e.get("job") or e.get("job_id")
        for e in events
        if e["ev"] in ("submit_ok", "submit_error", "connect_ok")
    }
    client = world.redis.client()
    records = {job: client.hgetall(job_key(job)) for job in sorted(j for j in jobs if j)}
    return {"seed": seed, "profile": profile.name, "broker": broker, "queues": queues, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--duration", type=float, default=None, help="override the profile's seconds")
    args = parser.parse_args()
    # SIGTERM (a test's timeout, ^C's cousin): end through ``finally``, so nothing is left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.randrange(1, 1_000_000)
    directory = args.dir or Path(tempfile.mkdtemp(prefix=f"ebb-chaos-{seed}-"))
    profile = PROFILES[args.profile]
    if args.duration is not None:
        profile = dataclasses.replace(profile, duration=args.duration)
    sys.exit(run(profile, seed, directory))


if __name__ == "__main__":
    main()
