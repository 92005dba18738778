"""What waiting jobs cost one RabbitMQ node, statistics on and off, and what auditing them costs.

A waiting job here is a three-queue job submitted and not yet run: its reply queues exist, its
caller consumes them, and its task message waits in a task queue no worker reads (a queue of this
run's own; the workflow check is off). ``--callers`` asyncio callers (``AsyncJobClient``, one
connection each) hold the jobs between them. For each broker measured, in one run:

- memory: the node's resident memory (VmRSS of its beam.smp, from /proc) with the jobs, less the
  same node's before them, per job; so the jobs per GB of broker memory;
- idle CPU: the node's beam.smp CPU over ``--idle-seconds`` or one metrics sweep interval,
  whichever is longer (the node's ``core_metrics_gc_interval``: RabbitMQ's 120 s, or the 600 s of
  deploy/rabbitmq-advanced.config on private nodes; each sweep copies every queue's metrics
  row, so a shorter window can miss it), once it has settled (right after
  100,000 submits a node spends minutes tidying up: the bench waits until two 10 s windows
  agree), less the settled node's own before the jobs, per job and second;
- the audit (``tasks.audit.Auditor.run``, as ``ebb audit`` and beat run it) over all those queues,
  ``--audit-repeat`` times, each in a fresh process so that its peak RSS is its own: wall time,
  peak RSS, where consumer counts came from. Its AMQP URL points at a closed port, so it cannot
  touch a queue over AMQP (a passive declare would renew a lease); the bench checks that the node
  still holds every queue, nothing was deleted and every queue was judged in use.

Targets (issue 22), for three-queue jobs on RabbitMQ 4.3:

  (b) broker memory per waiting job <= 64 KB, idle broker CPU <= 1 µs per job per second
  (c) the audit with the statistics off: < 15 s and < 300 MB peak RSS, touching no queue

Which brokers: by default the one of EBB_BROKER_URL (EBB_MANAGEMENT_URL, EBB_PROMETHEUS_URL of the
same node). ``--own-nodes on,off`` instead starts private single nodes of the rabbitmq-server that
``tests/cluster.py`` runs (EBB_TEST_RABBITMQ_ROOT: ``./dev``'s RabbitMQ 4.3 chroot; unset: the
machine's 3.10), with RabbitMQ's default statistics interval (5 s), the prometheus plugin, and
``management_agent.disable_metrics_collector = true`` for ``off``; each is stopped at the end::

    .venv/bin/python bench/bench_scale.py --own-nodes on,off --jobs 100000 [--json]
    .venv/bin/python bench/bench_scale.py --jobs 2000          # the broker of EBB_BROKER_URL

Registry records and the audit's memory go to database 11 of EBB_REDIS_URL's Redis and are
deleted at the end, as is every queue the run created. Exit code 0 when every target passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import redis
import requests

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_scale.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu import Target, cpu_seconds, target
from ebb import Job, Settings
from ebb.aio import AsyncJobClient
from ebb.records import KEY_PREFIX
from tasks.broker_api import shares_of

ROOT = Path(__file__).resolve().parents[1]
R = TypeVar("R")
TARGET_BYTES_PER_JOB = 64 * 1024
TARGET_IDLE_US = 1.0
TARGET_AUDIT_S = 15.0
TARGET_AUDIT_MB = 300.0
#: The bench's own registry database: its records and audit memory never meet a real deployment's.
REDIS_DB = 11
#: Private nodes (``--own-nodes``): node i of each listens on base+1, management 10000+base+1, ...
OWN_NODES = {"on": ("ebb-scale-on", 5820), "off": ("ebb-scale-off", 5824)}
OWN_EPMD_PORT = 4396
#: Submits outstanding per caller: enough to keep its connection busy, few enough to stay fair.
IN_FLIGHT_PER_CALLER = 64
SETTLE_WINDOW = 10.0
SETTLE_MIN = 300.0
SETTLE_MAX = 900.0
#: RabbitMQ's own ``core_metrics_gc_interval``: every sweep copies every queue's metrics row (14-15 s
#: of a core at 300,000 queues), so an idle window shorter than the interval can miss it.
RABBITMQ_SWEEP_S = 120.0


def documented_sweep_s() -> float:
    """The interval deploy/rabbitmq-advanced.config sets, in seconds."""
    text = (ROOT / "deploy" / "rabbitmq-advanced.config").read_text()
    match = re.search(r"core_metrics_gc_interval,\s*(\d+)", text)
    return int(match[1]) / 1000 if match else RABBITMQ_SWEEP_S


def say(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Broker:
    label: str
    settings: Settings
    measured: Target
    #: Stops a private node (``--own-nodes``) at once, with all it holds; None for a real broker.
    throw_away: Callable[[], None] | None = None
    #: How often the node sweeps its metrics tables (``core_metrics_gc_interval``), in seconds.
    sweep_s: float = RABBITMQ_SWEEP_S


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_ms_per_s(measured: Target, seconds: float) -> float:
    pids = measured.rabbitmq()
    start, began = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pids) - start) * 1000 / (time.monotonic() - began)


def while_callers_run(loop: asyncio.AbstractEventLoop, work: Callable[..., R], *args: Any) -> R:
    """``work(*args)`` on a thread while the callers' event loop runs (their heartbeats)."""
    return loop.run_until_complete(asyncio.to_thread(work, *args))


def settled_cpu_ms_per_s(measured: Target, floor_ms: float) -> tuple[float, float]:
    """Wait until the node is done with its own after-work: right after 100,000 submits RabbitMQ
    4.3 spends minutes at ~40 % of a core (its metadata store compacting, queue processes going
    to sleep). Settled: a 10 s window at or below ``floor_ms``, or two windows within 10 % (or
    1 ms/s) of each other after ``SETTLE_MIN``; at most ``SETTLE_MAX``. Returns (the last
    window's CPU, seconds waited); every window is logged, so the decay is on record."""
    began = time.monotonic()
    previous = cpu_ms_per_s(measured, SETTLE_WINDOW)
    while True:
        waited = time.monotonic() - began
        say(f"  settling: {previous:.1f} ms/s CPU after {waited:.0f} s")
        steady = waited >= SETTLE_MIN
        if previous <= floor_ms or waited >= SETTLE_MAX:
            return previous, waited
        current = cpu_ms_per_s(measured, SETTLE_WINDOW)
        if steady and abs(current - previous) <= max(0.1 * previous, 1.0):
            return current, time.monotonic() - began
        previous = current


def queue_total(broker: Broker) -> int:
    overview = api(broker, "overview")
    return int(overview.get("object_totals", {}).get("queues", 0))


def api(broker: Broker, path: str) -> Any:
    s = broker.settings
    response = requests.get(
        f"{broker.measured.management_url}/api/{path}",
        auth=(s.management_user, s.management_password),
        timeout=120,
    )
    response.raise_for_status()
    return response.json()


# --- holding the jobs ----------------------------------------------------------------------------


async def submit_all(
    settings: Settings, jobs: int, callers: int
) -> tuple[list[AsyncJobClient], list[Job], float]:
    """``jobs`` three-queue jobs from ``callers`` callers; they stay connected, consuming."""
    clients = [AsyncJobClient(settings=settings) for _ in range(callers)]
    for client in clients:
        await client.start()
    submitted: list[Job] = []
    started = time.monotonic()

    async def caller(client: AsyncJobClient, count: int) -> None:
        gate = asyncio.Semaphore(IN_FLIGHT_PER_CALLER)

        async def one() -> None:
            async with gate:
                submitted.append(
                    await client.submit_job(
                        "demo.echo", {"x": 1}, updates=True, on_finished=None, auto_cleanup_after_ttl=7200
                    )
                )
                if len(submitted) % 10_000 == 0:
                    say(f"{len(submitted)} submitted, {time.monotonic() - started:.0f} s")

        await asyncio.gather(*(one() for _ in range(count)))

    shares = [jobs // callers + (1 if i < jobs % callers else 0) for i in range(callers)]
    await asyncio.gather(*(caller(c, n) for c, n in zip(clients, shares, strict=True)))
    return clients, submitted, time.monotonic() - started


# --- the audit, in a process of its own -----------------------------------------------------------


def audit_once() -> None:
    """``--audit-child``: one audit run with the environment's settings, its figures as JSON."""
    from tasks.audit import Auditor

    auditor = Auditor(Settings.from_env())
    started = time.monotonic()
    report = auditor.run(delete_unexpiring=False)
    # VmHWM, not getrusage's ru_maxrss: that one survives exec, so a child of a bench holding
    # 100,000 jobs would report the bench's RSS as its own.
    peak_kb = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    print(
        json.dumps(
            {
                "seconds": time.monotonic() - started,
                "peak_rss_mb": peak_kb / 1024,
                "counts": report.counts(),
                "consumers_from": report.consumers_from,
            }
        )
    )


def prometheus_answer_seconds(settings: Settings, *, shares: bool = False) -> float:
    """The baseline of each audit run: how long the node takes to send the answer the audit
    reads (every queue's consumer count, ``/metrics/detailed``), read and thrown away: in one
    read, or (``shares``) in the EBB_AUDIT_STREAMS shares the audit asks a 4.3+ node for at once."""
    url = f"{settings.prometheus_url}/metrics/detailed"
    filters: list[str | None] = [None]
    if shares:  # the node's version says whether it can answer in shares
        identity = requests.get(url, params={"family": "identity_info"}, timeout=30)
        identity.raise_for_status()
        filters = shares_of(identity.content, settings.audit_streams)

    def read(queue_filter: str | None) -> None:
        params = {"family": "queue_consumer_count", "vhost": settings.vhost}
        if queue_filter is not None:
            params["queue"] = queue_filter
        with requests.get(
            url, params=params, headers={"Accept-Encoding": "identity"}, stream=True, timeout=300
        ) as response:
            response.raise_for_status()
            for _ in response.iter_content(1 << 20):
                pass

    started = time.monotonic()
    with ThreadPoolExecutor(len(filters)) as pool:
        list(pool.map(read, filters))
    return time.monotonic() - started


def audit_child(broker: Broker, *, stderr: int = subprocess.PIPE) -> dict[str, Any]:
    """One audit (``--audit-child``) of ``broker``'s queues in a fresh process, so that its peak
    RSS is its own; its AMQP URL a closed port, so that it cannot touch a queue. Its figures."""
    s = broker.settings
    env = {
        **os.environ,
        "EBB_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",  # closed: no queue can be touched
        "EBB_MANAGEMENT_URL": broker.measured.management_url,
        "EBB_MANAGEMENT_USER": s.management_user,
        "EBB_MANAGEMENT_PASSWORD": s.management_password,
        "EBB_PROMETHEUS_URL": s.prometheus_url,
        "EBB_REDIS_URL": s.redis_url,
        "EBB_VHOST": s.vhost,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--audit-child"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_audits(broker: Broker, repeat: int) -> dict[str, Any]:
    s = broker.settings
    before = queue_total(broker)
    runs = []
    bare: list[float] = []
    shared: list[float] = []
    for _ in range(repeat):
        bare.append(prometheus_answer_seconds(s))
        shared.append(prometheus_answer_seconds(s, shares=True))
        runs.append(audit_child(broker))
        counts = {k: v for k, v in runs[-1]["counts"].items() if v}
        say(
            f"{broker.label}: RabbitMQ's answer alone {bare[-1]:.2f} s in one read, "
            f"{shared[-1]:.2f} s in the audit's shares; "
            f"audit {runs[-1]['seconds']:.2f} s, peak RSS {runs[-1]['peak_rss_mb']:.0f} MB, "
            f"consumers from {runs[-1]['consumers_from']}, {counts}"
        )
    after = queue_total(broker)
    counts = runs[-1]["counts"]
    untouched = before == after and all(r["counts"]["deleted"] == 0 for r in runs)
    return {
        "runs": len(runs),
        "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
        "seconds_max": round(max(r["seconds"] for r in runs), 2),
        "seconds_each": [round(r["seconds"], 2) for r in runs],
        "rabbitmq_answer_seconds_each": [round(b, 2) for b in bare],
        "audit_over_rabbitmq_answer": [round(r["seconds"] / b, 2) for r, b in zip(runs, bare, strict=True)],
        "rabbitmq_answer_in_shares_seconds_each": [round(b, 2) for b in shared],
        "audit_over_answer_in_shares": [
            round(r["seconds"] / b, 2) for r, b in zip(runs, shared, strict=True)
        ],
        "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in runs)),
        "consumers_from": runs[-1]["consumers_from"],
        "queues_judged": sum(v for k, v in counts.items() if k in ("in_use", "suspect", "orphaned", "new")),
        "in_use": counts["in_use"],
        "untouched": untouched,
        "queues_before_after": [before, after],
    }


# --- one broker ------------------------------------------------------------------------------------


def measure(
    broker: Broker, jobs: int, callers: int, idle_seconds: float, audit_repeat: int
) -> dict[str, Any]:
    m = broker.measured
    base_cpu, waited = settled_cpu_ms_per_s(m, floor_ms=10.0)
    base_cpu = cpu_ms_per_s(m, idle_seconds)
    base_rss = rss_bytes(m.rabbitmq())
    say(
        f"{broker.label}: idle node {base_cpu:.2f} ms/s CPU, {base_rss / 1e6:.0f} MB "
        f"(settled in {waited:.0f} s)"
    )
    queue = f"bench.scale.{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(broker.settings, task_queue=queue, check_workflows=False)
    declare_task_queue(broker, queue)
    loop = asyncio.new_event_loop()
    clients: list[AsyncJobClient] = []
    submitted: list[Job] = []
    try:
        client_rss0 = rss_bytes([os.getpid()])
        clients, submitted, seconds = loop.run_until_complete(submit_all(settings, jobs, callers))
        say(f"{broker.label}: {jobs} jobs submitted in {seconds:.0f} s ({jobs / seconds:.0f}/s)")
        client_rss = rss_bytes([os.getpid()]) - client_rss0
        # The callers' loop keeps running while the bench waits: it answers their heartbeats.
        # Blocked for the 600 s window, it let RabbitMQ close every caller's connection, and the
        # audits then judged all 300,000 queues unused (bench run of 2026-12-07).
        loaded_cpu, waited = while_callers_run(
            loop, settled_cpu_ms_per_s, m, base_cpu + jobs * TARGET_IDLE_US / 1000
        )
        # A whole sweep interval: any window that long holds exactly one sweep.
        window = max(idle_seconds, broker.sweep_s)
        say(f"{broker.label}: measuring idle CPU over {window:.0f} s (one metrics sweep interval)")
        loaded_cpu = while_callers_run(loop, cpu_ms_per_s, m, window)
        loaded_rss = rss_bytes(m.rabbitmq())
        say(
            f"{broker.label}: settled in {waited:.0f} s; {loaded_cpu:.2f} ms/s CPU, {loaded_rss / 1e6:.0f} MB"
        )
        audit = while_callers_run(loop, run_audits, broker, audit_repeat) if audit_repeat else None
    finally:
        # A node of our own is thrown away whole, first: deleting 300,000 queues one by one, or
        # even closing callers that consume them all, would take longer than the measurement.
        if broker.throw_away is not None:
            broker.throw_away()
        loop.run_until_complete(delete_all(clients, [] if broker.throw_away else submitted))
        loop.run_until_complete(finish_tasks())
        loop.close()
        if broker.throw_away is None:  # a thrown-away node took its task queue with it
            delete_queue(broker, queue)
    per_job = (loaded_rss - base_rss) / jobs
    idle_us = max(0.0, loaded_cpu - base_cpu) * 1000 / jobs
    return {
        "broker": broker.label,
        "rabbitmq": m.version,
        "jobs": jobs,
        "callers": callers,
        "submit_jobs_per_s": round(jobs / seconds, 1),
        "node_idle_cpu_ms_per_s": round(base_cpu, 2),
        "node_rss_before_mb": round(base_rss / 1e6),
        "node_rss_with_jobs_mb": round(loaded_rss / 1e6),
        "broker_bytes_per_job": round(per_job),
        "jobs_per_gb": round(1e9 / per_job) if per_job > 0 else None,
        "idle_cpu_us_per_job_per_s": round(idle_us, 3),
        "idle_window_s": round(max(idle_seconds, broker.sweep_s)),
        "settle_s": round(waited),
        "client_bytes_per_job": round(client_rss / jobs),
        "audit": audit,
    }


async def delete_all(clients: list[AsyncJobClient], jobs: list[Job]) -> None:
    """Every job's queues deleted by its caller, then the callers closed."""
    owner = {}
    for client in clients:
        for job_id in list(client._core.watches) if jobs else []:
            owner[job_id] = client
    gate = asyncio.Semaphore(256)

    async def drop(job: Job) -> None:
        async with gate:
            client = owner.get(job.id)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.disconnect_from_submitted_job(job, delete_queues=True)

    await asyncio.gather(*(drop(job) for job in jobs))
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()


async def finish_tasks() -> None:
    """What the closed connections left running (aiormq's closing writers) ends before the loop."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=10)
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def declare_task_queue(broker: Broker, queue: str) -> None:
    s = broker.settings
    response = requests.put(
        f"{broker.measured.management_url}/api/queues/{quote(s.vhost, safe='')}/{quote(queue, safe='')}",
        json={"durable": True, "auto_delete": False, "arguments": {}},
        auth=(s.management_user, s.management_password),
        timeout=30,
    )
    response.raise_for_status()


def delete_queue(broker: Broker, queue: str) -> None:
    s = broker.settings
    requests.delete(
        f"{broker.measured.management_url}/api/queues/{quote(s.vhost, safe='')}/{quote(queue, safe='')}",
        auth=(s.management_user, s.management_password),
        timeout=60,
    )


def forget_registry(settings: Settings) -> None:
    """The records and audit memory this run wrote to its own database."""
    client = redis.Redis.from_url(settings.redis_url)
    with contextlib.closing(client):
        keys = list(client.scan_iter(f"{KEY_PREFIX}*", count=5000)) + list(client.scan_iter("ebb:audit:*"))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])


# --- which brokers ---------------------------------------------------------------------------------


def bench_redis(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{REDIS_DB}"))


@contextlib.contextmanager
def brokers(own: list[str]) -> Iterator[list[Broker]]:
    base = Settings.from_env()
    base = dataclasses.replace(base, redis_url=bench_redis(base.redis_url))
    if not own:
        yield [Broker("EBB_BROKER_URL", base, target(base))]
        return
    from tests.cluster import Cluster

    started: list[Cluster] = []
    try:
        found = []
        for mode in own:
            prefix, port = OWN_NODES[mode]
            cluster = Cluster(
                Path(tempfile.mkdtemp(prefix=f"ebb-scale-{mode}-")),
                size=1,
                prefix=prefix,
                base_port=port,
                epmd_port=OWN_EPMD_PORT,
                plugins=("rabbitmq_prometheus",),
                statistics_interval_ms=5000,
                extra_conf="management_agent.disable_metrics_collector = true" if mode == "off" else "",
                # The documented deployment's metrics sweep (every 10 minutes, not RabbitMQ's 2).
                advanced_config=(ROOT / "deploy" / "rabbitmq-advanced.config").read_text(),
            )
            say(f"starting {cluster.node(1).name} (statistics {mode})")
            cluster.start()
            started.append(cluster)
            node = cluster.node(1)
            settings = dataclasses.replace(
                base,
                broker_url=node.amqp_url,
                management_url=node.management_url,
                prometheus_url=node.prometheus_url,
                management_user="guest",
                management_password="guest",
            )
            apply_expiry_policy(node.management_url)
            found.append(
                Broker(
                    f"statistics {mode}",
                    settings,
                    target(settings),
                    throw_away=cluster.stop,
                    sweep_s=documented_sweep_s(),
                )
            )
        yield found
    finally:
        for cluster in started:
            cluster.stop()
            shutil.rmtree(cluster.home, ignore_errors=True)


def apply_expiry_policy(management_url: str) -> None:
    """The safety net every deployment applies (deploy/rabbitmq-policy.sh): with it, the audit
    needs no queue's arguments, so not the management API's slow listing."""
    subprocess.run(
        ["sh", str(ROOT / "deploy" / "rabbitmq-policy.sh")],
        env={
            **os.environ,
            "RABBITMQ_URL": management_url,
            "RABBITMQ_ADMIN_USER": "guest",
            "RABBITMQ_ADMIN_PASSWORD": "guest",
            "EBB_MAX_TTL": "604800",
        },
        check=True,
        capture_output=True,
        timeout=60,
    )


# --- report ----------------------------------------------------------------------------------------


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    checks = {
        "(b) bytes per job <= 64 KB": result["broker_bytes_per_job"] <= TARGET_BYTES_PER_JOB,
        "(b) idle CPU <= 1 µs/job/s": result["idle_cpu_us_per_job_per_s"] <= TARGET_IDLE_US,
    }
    audit = result["audit"]
    if audit is not None and audit["consumers_from"] == "prometheus":
        checks["(c) audit < 15 s"] = audit["seconds_max"] < TARGET_AUDIT_S
        checks["(c) audit < 300 MB"] = audit["peak_rss_mb_max"] < TARGET_AUDIT_MB
        checks["(c) no queue touched, all judged in use"] = (
            audit["untouched"] and audit["in_use"] == 3 * result["jobs"]
        )
    return checks


def print_table(results: list[dict[str, Any]], load: dict[str, float]) -> None:
    print(f"load average (1 min) before {load['before']:.2f}, after {load['after']:.2f}")
    for r in results:
        print(
            f"RabbitMQ {r['rabbitmq']}, {r['broker']}: {r['jobs']} waiting three-queue jobs from "
            f"{r['callers']} callers (submitted at {r['submit_jobs_per_s']}/s)"
        )
        print(
            f"  broker memory {r['broker_bytes_per_job']:,} bytes/job ({r['jobs_per_gb']:,} jobs per GB; "
            f"node {r['node_rss_before_mb']} -> {r['node_rss_with_jobs_mb']} MB)"
        )
        print(
            f"  idle broker CPU {r['idle_cpu_us_per_job_per_s']} µs/job/s over {r['idle_window_s']} s "
            f"(node alone "
            f"{r['node_idle_cpu_ms_per_s']} ms/s; settled after {r['settle_s']} s)"
        )
        print(f"  caller memory {r['client_bytes_per_job']:,} bytes/job")
        a = r["audit"]
        if a is not None:
            print(
                f"  audit ({a['consumers_from']}): median {a['seconds_median']} s, max {a['seconds_max']} s, "
                f"peak RSS {a['peak_rss_mb_max']} MB over {a['runs']} runs; {a['in_use']} queues in use; "
                f"queues before/after {a['queues_before_after'][0]}/{a['queues_before_after'][1]}"
            )
        if a is not None:
            for baseline, seconds, ratio in (
                ("in one read", "rabbitmq_answer_seconds_each", "audit_over_rabbitmq_answer"),
                (
                    "in the audit's shares",
                    "rabbitmq_answer_in_shares_seconds_each",
                    "audit_over_answer_in_shares",
                ),
            ):
                print(
                    f"  audit / RabbitMQ's answer alone {baseline}, each run: "
                    + ", ".join(
                        f"{x} s / {y} s = {z}"
                        for x, y, z in zip(a["seconds_each"], a[seconds], a[ratio], strict=True)
                    )
                )
        for name, ok in verdicts(r).items():
            print(f"  {name}: {'PASS' if ok else 'FAIL'}")


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="waiting three-queue jobs (2000)")
    parser.add_argument("--callers", type=int, default=4, help="asyncio callers holding them (4)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="CPU window once settled (30 s)")
    parser.add_argument("--audit-repeat", type=int, default=3, help="audit runs per broker (3; 0: none)")
    parser.add_argument("--own-nodes", default="", help="'on,off': private nodes instead of EBB_BROKER_URL's")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    parser.add_argument("--audit-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.audit_child:
        audit_once()
        return 0
    own = [m.strip() for m in args.own_nodes.split(",") if m.strip()]
    unknown = set(own) - set(OWN_NODES)
    if unknown:
        parser.error(f"--own-nodes takes 'on' and/or 'off', not {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # so that the nodes are stopped, as on Ctrl-C
    load = {"before": os.getloadavg()[0]}
    results = []
    with brokers(own) as measured:
        try:
            for broker in measured:
                say(f"measuring {broker.measured.describe()}")
                results.append(measure(broker, args.jobs, args.callers, args.idle_seconds, args.audit_repeat))
                say(f"{broker.label}: {json.dumps(results[-1])}")  # on record before any teardown
        finally:
            forget_registry(measured[0].settings)
    load["after"] = os.getloadavg()[0]
    passed = all(ok for r in results for ok in verdicts(r).values())
    if args.json:
        print(json.dumps({"load_avg_1min": load, "results": results, "passed": passed}, indent=2))
    else:
        print_table(results, load)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
