"""What in-flight jobs cost one RabbitMQ node: memory per job, jobs per GB, idle CPU per job and second.

Against the broker of EBB_BROKER_URL (EBB_MANAGEMENT_URL must be the same node). An in-flight job
here is one submitted and waiting: its reply queues exist (one, or all three),
its client consumes them, and its task message waits in a task queue no worker reads (a queue of
this run's own, declared here; the workflow check is off). Memory is RabbitMQ's own figure
(``mem_used`` of that node from the management API, after a settle), CPU is that node's beam.smp's
(the process listening on the AMQP port) from /proc, less what the idle node spends without the
jobs, measured in the same run::

    .venv/bin/python bench/bench_scale.py [--jobs N] [--idle-seconds S] [--json]

Everything the run creates is deleted at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_scale.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu import Target, cpu_seconds, target
from ebb import Job, JobClient, Settings

SETTLE = 8.0  # management statistics are refreshed every 5 s


def say(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def api(settings: Settings, measured: Target, path: str) -> Any:
    response = requests.get(
        f"{measured.management_url}/api/{path}",
        auth=(settings.management_user, settings.management_password),
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def mem_used(settings: Settings, measured: Target) -> int:
    """The measured node's own figure (not the first node of a cluster's list)."""
    time.sleep(SETTLE)
    return int(api(settings, measured, f"nodes/{quote(measured.node, safe='')}")["mem_used"])


def idle_cpu_ms_per_s(measured: Target, seconds: float) -> float:
    pids = measured.rabbitmq()
    start = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - start) * 1000 / seconds


def measure(
    settings: Settings, measured: Target, jobs: int, three: bool, idle_seconds: float
) -> dict[str, float]:
    """Memory and idle CPU of ``jobs`` in-flight jobs, against the same node without them."""
    base_mem = mem_used(settings, measured)
    base_cpu = idle_cpu_ms_per_s(measured, idle_seconds)
    with JobClient(settings=settings) as client:
        submitted: list[Job] = []
        started = time.monotonic()
        for _ in range(jobs):
            submitted.append(
                client.submit_job(
                    "demo.echo",
                    {"x": 1},
                    on_finished=lambda j, r: None,
                    on_progress=(lambda j, p: None) if three else None,
                    on_status=(lambda j, s: None) if three else None,
                    auto_cleanup_after_ttl=600,
                )
            )
        kind = "three queues" if three else "result queue"
        say(f"{jobs} jobs submitted in {time.monotonic() - started:.1f} s ({kind})")
        loaded_mem = mem_used(settings, measured)
        loaded_cpu = idle_cpu_ms_per_s(measured, idle_seconds)
        for job in submitted:
            client.disconnect_from_submitted_job(job, delete_queues=True)
    per_job = (loaded_mem - base_mem) / jobs
    idle = max(0.0, loaded_cpu - base_cpu)
    return {
        "jobs": jobs,
        "queues_per_job": 3 if three else 1,
        "broker_bytes_per_job": round(per_job),
        "jobs_per_gb": round(1e9 / per_job) if per_job > 0 else 0,
        "node_idle_cpu_ms_per_s": round(base_cpu, 2),
        "idle_cpu_us_per_job_per_s": round(idle * 1000 / jobs, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="in-flight jobs per measurement (2000)")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="CPU sampling window (20 s)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args(argv)
    base = Settings.from_env()
    measured = target(base)
    say(f"measuring {measured.describe()}")
    # Other work on the machine (or on the same broker) skews the idle CPU: a high load means noise.
    load = {"before": os.getloadavg()[0]}
    queue = f"bench.scale.{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(base, task_queue=queue, check_workflows=False)
    with JobClient(settings=base) as admin:
        admin._loop.call(lambda: admin._publish_channel.queue_declare(queue, durable=True, auto_delete=False))
    try:
        results = [
            measure(settings, measured, args.jobs, three, args.idle_seconds) for three in (False, True)
        ]
    finally:
        requests.delete(
            f"{measured.management_url}/api/queues/{quote(base.vhost, safe='')}/{quote(queue, safe='')}",
            auth=(base.management_user, base.management_password),
            timeout=30,
        )
    load["after"] = os.getloadavg()[0]
    if args.json:
        document = {
            "rabbitmq": measured.version,
            "broker": measured.to_dict(),
            "load_avg_1min": load,
            "results": results,
        }
        print(json.dumps(document, indent=2))
        return 0
    print(f"measured: {measured.describe()}")
    print(f"load average (1 min) before {load['before']:.2f}, after {load['after']:.2f}")
    print(f"RabbitMQ {measured.version}: in-flight jobs (queues + consumers + the waiting task message)")
    print(f"{'queues/job':>10}{'jobs':>8}{'bytes/job':>12}{'jobs per GB':>14}{'idle µs CPU/job/s':>20}")
    for r in results:
        print(
            f"{r['queues_per_job']:>10}{r['jobs']:>8}{r['broker_bytes_per_job']:>12}"
            f"{r['jobs_per_gb']:>14}{r['idle_cpu_us_per_job_per_s']:>20}"
        )
    print(f"(the idle node alone: {results[0]['node_idle_cpu_ms_per_s']} ms CPU per second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
