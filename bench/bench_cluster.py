"""What a job's three queues cost on a three-node cluster: classic against quorum queues.

Starts the test cluster (``tests/cluster.py``: three local nodes of this machine's
rabbitmq-server, their own ports, cookie and epmd), then runs the same churn per "job" on node 2
for each queue type, one after the other: declare three queues (``x-expires``, durable), publish
one persistent message to each, consume and ack them, delete the three. It prints jobs/s and the
CPU every node spent per job (from /proc), and the ratio quorum / classic::

    .venv/bin/python bench/bench_cluster.py [--jobs N] [--json]

The cluster is always stopped at the end; it never touches the machine's own broker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import amqp

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_cluster.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu import CpuMeter
from ebb.contract import QUEUE_TYPES
from tests.cluster import Cluster


def churn(cluster: Cluster, queue_type: str, jobs: int, warmup: int) -> dict[str, Any]:
    node = cluster.node(2)
    connection = amqp.Connection(f"127.0.0.1:{node.amqp_port}", userid="guest", password="guest")
    connection.connect()
    channel = connection.channel()
    channel.confirm_select()
    received: list[amqp.Message] = []
    arguments = {"x-expires": 600_000, "x-queue-type": queue_type}

    def one_job() -> None:
        names = [f"jobs.{uuid.uuid4()}.{kind}" for kind in ("progress", "result", "status")]
        for name in names:
            channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
        for name in names:
            channel.basic_publish(amqp.Message(b'{"v":1}', delivery_mode=2), exchange="", routing_key=name)
        tags = [channel.basic_consume(name, callback=received.append) for name in names]
        deadline = time.monotonic() + 30
        while len(received) < len(names):
            if time.monotonic() > deadline:
                raise RuntimeError("a churn message never arrived")
            connection.drain_events(timeout=30)
        for message in received:
            channel.basic_ack(message.delivery_info["delivery_tag"])
        received.clear()
        for tag in tags:
            channel.basic_cancel(tag)
        for name in names:
            channel.queue_delete(name)

    for _ in range(warmup):
        one_job()

    def pids_of(index: int) -> Callable[[], list[int]]:
        return lambda: [pid] if (pid := cluster.node(index).pid()) else []

    meter = CpuMeter({f"n{n.index}": pids_of(n.index) for n in cluster.nodes})
    meter.start()
    start = time.perf_counter()
    for _ in range(jobs):
        one_job()
    seconds = time.perf_counter() - start
    cpu = meter.per_job(jobs)
    connection.close()
    return {"queue_type": queue_type, "jobs": jobs, "jobs_per_s": jobs / seconds, "cpu_ms": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs per queue type (200)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="ebb-bench-cluster-")))
    print("[bench] starting a three-node cluster (about 30 s)", file=sys.stderr, flush=True)
    try:
        cluster.start()
        rows = [churn(cluster, queue_type, args.jobs, warmup=10) for queue_type in QUEUE_TYPES]
    finally:
        cluster.stop()
    classic, quorum = rows
    ratio = sum(quorum["cpu_ms"].values()) / max(sum(classic["cpu_ms"].values()), 1e-9)
    if args.json:
        print(json.dumps({"rows": rows, "quorum_over_classic_cpu": ratio}, indent=2))
        return 0
    print(f"three queues per job on a 3-node cluster (caller on node 2), {args.jobs} jobs each")
    print(
        f"{'queue type':<12}{'jobs/s':>10}"
        + "".join(f"{g + ' ms':>10}" for g in rows[0]["cpu_ms"])
        + f"{'total':>10}"
    )
    for row in rows:
        cpu = row["cpu_ms"]
        print(
            f"{row['queue_type']:<12}{row['jobs_per_s']:>10.1f}"
            + "".join(f"{v:>10.2f}" for v in cpu.values())
            + f"{sum(cpu.values()):>10.2f}"
        )
    speed = quorum["jobs_per_s"] / classic["jobs_per_s"]
    print(f"quorum / classic: broker CPU per job {ratio:.2f}x, throughput {speed:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
