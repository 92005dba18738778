"""The faults a chaos run injects, each one a function of the world, the fault and the history.

Every fault writes ``fault`` when it starts and ``fault_end`` when it is over (with what it did),
so the checker and a reader can line calls up with what was going on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ebb import EbbError, JobClient
from ebb.config import Settings
from tests.chaos import history as chaos_history
from tests.chaos.history import History
from tests.chaos.schedule import Fault
from tests.chaos.world import World, wait_ready
from tests.support import freeze

#: The memory high watermark a memory alarm sets (a fraction of RAM: a few hundred KB here).
ALARM_WATERMARK = "0.00001"
NORMAL_WATERMARK = "0.4"

Injector = Callable[[World, Fault, History], dict[str, Any]]


def _node(world: World, fault: Fault) -> int:
    return 1 + fault.pick % world.profile.nodes


def _ctl(world: World, node: int, *args: str) -> str:
    try:
        return world.cluster.ctl(node, *args, timeout=120).stdout.strip()[:200]
    except subprocess.CalledProcessError as exc:
        return f"failed: {exc.stderr.strip()[:200]}"


def _await_node(world: World, node: int) -> None:
    world.cluster._await(world.cluster.node(node))


def pool_kill(world: World, fault: Fault, h: History) -> dict[str, Any]:
    live = [w for w in world.workers if w.proc.poll() is None]
    if not live:
        return {"skipped": "no live worker"}
    worker = live[fault.pick % len(live)]
    pool = worker.pool()
    if not pool:
        return {"skipped": f"{worker.name} has no pool process"}
    pid = pool[fault.pick % len(pool)]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return {"worker": worker.name, "pid": pid}


def worker_kill(world: World, fault: Fault, h: History) -> dict[str, Any]:
    live = [w for w in world.workers if w.proc.poll() is None]
    if not live:
        return {"skipped": "no live worker"}
    worker = live[fault.pick % len(live)]
    worker.kill()
    replacement = world.start_worker()
    ready = wait_ready(replacement, 90)
    cancelled = _cancel_one_in_flight(world, fault, h) if ready else None
    return {"worker": worker.name, "replacement": replacement.name, "ready": ready, "cancelled": cancelled}


def _cancel_one_in_flight(world: World, fault: Fault, h: History) -> str | None:
    """Right after a worker has started: cancel a job that is queued or running, as a caller would."""
    in_flight = _jobs_in_flight(world)
    if not in_flight:
        return None
    job_id = in_flight[fault.pick % len(in_flight)]
    settings = Settings.from_env(world.caller_env(0))
    started = time.monotonic()
    h.record("cancel_start", job=job_id, bound=10.0)
    try:
        with JobClient(settings=settings) as client:
            client.cancel_job(job_id)
    except EbbError as exc:
        h.record(
            "cancel_error", job=job_id, elapsed=round(time.monotonic() - started, 3), bound=20.0,
            error=type(exc).__name__, ebb=True, retryable=True, message=str(exc)[:300],
        )  # fmt: skip
        return None
    h.record("cancel_ok", job=job_id, elapsed=round(time.monotonic() - started, 3), bound=20.0)
    return job_id


def _jobs_in_flight(world: World) -> list[str]:
    events = chaos_history.read(world.directory / "history.jsonl")
    submitted = [e["job"] for e in events if e["ev"] == "submit_ok"]
    done = {e["job"] for e in events if e["ev"] == "delivered"}
    return [j for j in submitted if j not in done][-20:]


def caller_kill(world: World, fault: Fault, h: History) -> dict[str, Any]:
    live = [p for p in world.live_callers()]
    if not live:
        return {"skipped": "no live caller"}
    proc = live[fault.pick % len(live)]
    client, popen = world.callers[proc]
    popen.kill()
    popen.wait(10)
    held = jobs_held(chaos_history.read(world.directory / "history.jsonl"), proc)
    rescuer = f"rescuer-{len(world.callers) + 1}"
    index = int(fault.pick % 7)
    world.start_caller(rescuer, client, index, world.until, held)
    return {"caller": proc, "rescuer": rescuer, "jobs": len(held)}


def jobs_held(events: list[dict[str, Any]], proc: str) -> list[str]:
    """The jobs a (killed) caller held: submitted, connected or uncertain, without a result yet."""
    held: dict[str, None] = {}  # in order, once each
    for e in events:
        if e["proc"] != proc:
            continue
        job = str(e.get("job") or e.get("job_id"))
        if e["ev"] in ("submit_ok", "connect_ok") or (e["ev"] == "submit_error" and e.get("job_id")):
            held[job] = None
        elif e["ev"] == "caller_start":
            held.update(dict.fromkeys(e.get("rescue") or []))
        elif e["ev"] in ("delivered", "disconnect_ok"):
            held.pop(job, None)
    return list(held)


def broker_restart(world: World, fault: Fault, h: History) -> dict[str, Any]:
    node = _node(world, fault)
    stopped = _ctl(world, node, "stop_app")
    time.sleep(1)
    started = _ctl(world, node, "start_app")
    _await_node(world, node)
    return {"node": node, "stop_app": stopped or "ok", "start_app": started or "ok"}


def node_stop(world: World, fault: Fault, h: History) -> dict[str, Any]:
    return _node_down(world, fault, world.cluster.stop_node)


def node_kill(world: World, fault: Fault, h: History) -> dict[str, Any]:
    return _node_down(world, fault, world.cluster.kill_node)


def _node_down(world: World, fault: Fault, take_down: Callable[[int], None]) -> dict[str, Any]:
    node = _node(world, fault)
    take_down(node)
    time.sleep(fault.hold)
    world.cluster.start_node(node)
    return {"node": node, "down_s": fault.hold}


def memory_alarm(world: World, fault: Fault, h: History) -> dict[str, Any]:
    node = _node(world, fault)
    raised = _ctl(world, node, "set_vm_memory_high_watermark", ALARM_WATERMARK)
    time.sleep(fault.hold)
    cleared = _ctl(world, node, "set_vm_memory_high_watermark", NORMAL_WATERMARK)
    return {"node": node, "raised": raised or "ok", "cleared": cleared or "ok", "held_s": fault.hold}


def connections_closed(world: World, fault: Fault, h: History) -> dict[str, Any]:
    out = [
        _ctl(world, n, "close_all_connections", "chaos: every connection closed") for n in _up_nodes(world)
    ]
    return {"nodes": len(out)}


def _up_nodes(world: World) -> list[int]:
    return [n.index for n in world.cluster.nodes if n.pid() is not None]


def proxy_freeze(world: World, fault: Fault, h: History) -> dict[str, Any]:
    world.amqp_proxy.freeze()
    time.sleep(fault.hold)
    world.amqp_proxy.signal(signal.SIGCONT)
    return {"frozen_s": fault.hold}


def proxy_reset(world: World, fault: Fault, h: History) -> dict[str, Any]:
    world.amqp_proxy.kill()
    time.sleep(1)
    world.amqp_proxy.start()
    return {"port": world.amqp_proxy.port}


def redis_restart(world: World, fault: Fault, h: History) -> dict[str, Any]:
    world.redis.shutdown()
    time.sleep(1)
    world.redis.start()
    return {"port": world.redis.port}


def redis_hang(world: World, fault: Fault, h: History) -> dict[str, Any]:
    assert world.redis.proc is not None
    freeze(world.redis.proc.pid)
    time.sleep(fault.hold)
    world.redis.proc.send_signal(signal.SIGCONT)
    return {"hung_s": fault.hold}


def management_down(world: World, fault: Fault, h: History) -> dict[str, Any]:
    """Out of reach for at least two audit intervals, so that an audit runs into it."""
    world.management_proxy.kill()
    time.sleep(max(fault.hold, 9.0))
    world.management_proxy.start()
    return {"down_s": max(fault.hold, 9.0)}


INJECTORS: dict[str, Injector] = {
    "pool_kill": pool_kill,
    "worker_kill": worker_kill,
    "caller_kill": caller_kill,
    "broker_restart": broker_restart,
    "node_stop": node_stop,
    "node_kill": node_kill,
    "memory_alarm": memory_alarm,
    "connections_closed": connections_closed,
    "proxy_freeze": proxy_freeze,
    "proxy_reset": proxy_reset,
    "redis_restart": redis_restart,
    "redis_hang": redis_hang,
    "management_down": management_down,
}


def all_up(world: World) -> bool:
    """After the last fault: every node, Redis and proxy back (the run's end state is judged)."""
    proxies = (world.amqp_proxy, world.management_proxy)
    return (
        all(n.pid() is not None for n in world.cluster.nodes)
        and world.redis.up()
        and all(p.proc is not None and p.proc.poll() is None for p in proxies)
    )
