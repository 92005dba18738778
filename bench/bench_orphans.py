"""What the audit costs when every caller vanished at once: 100,000 jobs' queues left unused.

The worst case of the audit's memory. ``--jobs`` three-queue jobs' queues are declared on a
private RabbitMQ 4.3 node (statistics off, the safety-net policy applied, as ``bench_scale.py
--own-nodes off`` starts it) with no consumer, as their callers left them, and each job has
the registry record its caller wrote (``SUBMITTED``). Then the audit (``tasks.audit.Auditor.run``,
as ``ebb audit`` and beat run it) runs ``--audit-repeat`` times, each in a fresh process whose
AMQP URL is a closed port: the first run finds every queue a suspect, the second confirms them
all as orphans (one ``orphan_found`` line and one memo each), later runs find them again and
hold both hashes of memos. For each run: wall time, peak RSS (VmHWM), the verdicts, and the
baseline, RabbitMQ's answer alone (the Prometheus answer the audit reads, read and thrown away)
just before it. The bench checks that every queue is still there afterwards (an audit removes
nothing: RabbitMQ does, at the TTL)::

    .venv/bin/python bench/bench_orphans.py --jobs 100000 [--audit-repeat 3] [--json]

Target (issue 22, (c)'s memory bound at its worst case): peak RSS < 300 MB in every run. Exit code
0 when it passed. The node is thrown away at the end, with the registry's database 11.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp
import redis

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_orphans.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_scale import (
    TARGET_AUDIT_MB,
    Broker,
    audit_child,
    brokers,
    forget_registry,
    prometheus_answer_seconds,
    queue_total,
    say,
)
from ebb.contract import QueueKind, queue_name
from ebb.records import job_key
from tasks.audit import CONFIRM_AFTER

#: Connections declaring the queues at once.
DECLARERS = 16
#: The queues' TTL: longer than the run, so that only an audit could remove one (none may).
TTL_S = 7200
TARGET_PEAK_MB = TARGET_AUDIT_MB


def declare_unused(broker: Broker, jobs: list[uuid.UUID]) -> float:
    """Every job's three queues, declared with its TTL and left without a consumer."""
    url = urlsplit(broker.settings.broker_url)
    started = time.monotonic()
    errors: list[BaseException] = []

    def declare(share: list[uuid.UUID]) -> None:
        try:
            with amqp.Connection(
                url.netloc.rpartition("@")[2],
                userid=unquote(url.username or ""),
                password=unquote(url.password or ""),
            ) as conn:
                channel = conn.channel()
                for n, job in enumerate(share, 1):
                    for kind in QueueKind:
                        channel.queue_declare(
                            queue_name(job, kind),
                            durable=True,
                            auto_delete=False,
                            arguments={"x-expires": TTL_S * 1000},
                            nowait=True,
                        )
                    if n % 200 == 0:  # a round trip now and then, so that flow control holds
                        channel.basic_qos(0, 0, False)
                channel.basic_qos(0, 0, False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=declare, args=(jobs[i::DECLARERS],)) for i in range(DECLARERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.monotonic() - started


def write_records(url: str, jobs: list[uuid.UUID]) -> None:
    """The record each job's caller wrote at submit, as the audit reads it."""
    client = redis.Redis.from_url(url)
    now = str(time.time())
    for start in range(0, len(jobs), 1000):
        pipe = client.pipeline(transaction=False)
        for job in jobs[start : start + 1000]:
            key = job_key(job)
            pipe.hset(key, mapping={"status": "SUBMITTED", "ttl": str(TTL_S), "queues_last_in_use": now})
            pipe.expire(key, TTL_S * 2)
        pipe.execute()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="vanished callers' jobs (100000)")
    parser.add_argument("--audit-repeat", type=int, default=3, help="audit runs (3: find, confirm, again)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    with brokers(["off"]) as found:
        broker = found[0]
        try:
            jobs = [uuid.uuid4() for _ in range(args.jobs)]
            write_records(broker.settings.redis_url, jobs)
            seconds = declare_unused(broker, jobs)
            say(f"{args.jobs * 3} unused queues declared in {seconds:.0f} s")
            before = queue_total(broker)
            last_start = 0.0
            for _ in range(args.audit_repeat):
                answer = prometheus_answer_seconds(broker.settings)
                # A suspect is confirmed by a run at least CONFIRM_AFTER after the one that found it.
                time.sleep(max(0.0, last_start + CONFIRM_AFTER + 0.5 - time.monotonic()))
                last_start = time.monotonic()
                # Its 300,000 orphan_found lines go nowhere: kept, they would fill this process.
                run = audit_child(broker, stderr=subprocess.DEVNULL)
                run["rabbitmq_answer_seconds"] = round(answer, 2)
                run["counts"] = {k: v for k, v in run["counts"].items() if v}
                runs.append(run)
                say(
                    f"RabbitMQ's answer alone {answer:.2f} s; audit {run['seconds']:.2f} s "
                    f"({run['seconds'] / answer:.2f}x), peak RSS {run['peak_rss_mb']:.0f} MB, {run['counts']}"
                )
            after = queue_total(broker)
        finally:
            forget_registry(broker.settings)
    passed = bool(runs) and all(r["peak_rss_mb"] < TARGET_PEAK_MB for r in runs) and before == after
    result = {"jobs": args.jobs, "queues_before_after": [before, after], "runs": runs, "passed": passed}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for n, r in enumerate(runs, 1):
            peak = r["peak_rss_mb"]
            verdict = "PASS" if peak < TARGET_PEAK_MB else "FAIL"
            ratio = r["seconds"] / r["rabbitmq_answer_seconds"]
            print(
                f"run {n}: {r['seconds']:.2f} s ({ratio:.2f}x RabbitMQ's answer alone, "
                f"{r['rabbitmq_answer_seconds']:.2f} s), peak RSS {peak:.0f} MB "
                f"(< {TARGET_PEAK_MB:.0f}: {verdict}), {r['counts']}"
            )
        touched = "untouched" if before == after else "TOUCHED"
        print(f"queues before / after the audits: {before} / {after} ({touched})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
