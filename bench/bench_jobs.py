"""What do Ebb's per-job reply queues cost? Ebb end to end against its two ingredients, in one run.

Ebb is Celery plus self-cleaning reply queues, so this measures, against the broker of
EBB_BROKER_URL (EBB_MANAGEMENT_URL must be the same node; EBB_REDIS_URL's Redis for results):
raw three-queue churn (declare, publish, get, ack, delete on one kombu connection, persistent
messages), the lean churn (declare x3, publish x3 transient, basic.consume, ack, cancel,
delete x3, on one py-amqp connection), bare Celery (Redis results) and Ebb itself (result queue
only, and all three queues; then all three queues from ``AsyncJobClient``, with coroutine
callbacks, N in flight through ``asyncio.gather``), with the CPU each process spent per job
(from /proc), and checks three targets against the lean churn, and one of the async client
against the sync one:

  (a) Ebb throughput, N jobs in flight / lean churn throughput                 >= 0.8
  (b) Ebb sequential median latency / (bare Celery median + lean churn median) <= 1.3
  (c) RabbitMQ CPU per Ebb job (in flight) / RabbitMQ CPU per lean churn job   <= 1.3
  (d) async / sync Ebb throughput, three queues, N jobs in flight              >= 1.0

(d) runs two in-flight rounds of each client in ABBA order (sync, async, async, sync) on one
worker, so that a drift of the machine or the broker over the run weighs on both alike.

Run from anywhere (workers start in the repository root, where ``tasks`` and ``bench`` live)::

    .venv/bin/python bench/bench_jobs.py [--quick] [--jobs N] [--seq N] [--json] [--worker-toggles NAMES]
    EBB_BROKER_URL=amqp://guest:guest@127.0.0.1:5675// EBB_MANAGEMENT_URL=http://127.0.0.1:15675 \
        .venv/bin/python bench/bench_jobs.py          # another broker: its beam.smp is the one measured

The table goes to stdout; with ``--json`` one JSON document goes to stdout and the table to
stderr. Progress lines go to stderr. Workers run in their own sessions and are always stopped;
every queue the run creates is deleted at the end, and checked for on the management API.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import amqp
import requests
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.connection import Connection
from kombu.messaging import Producer

from ebb import Job, JobClient, Settings, UnknownWorkflowError, contract
from ebb.aio import AsyncJobClient
from ebb.contract import QueueKind

T = TypeVar("T")

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_jobs.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu import CpuMeter, Target, first_url, local_port, safe_url, target  # noqa: E402
from bench.harness import (  # noqa: E402
    INTERRUPTS,
    ROOT,
    broker_meta,
    delete_from_broker,
    leftover_line,
    leftover_queues,
    meter_for,
    progress,
    remove_logs,
    worker,
)

say = progress("bench")
#: Its groups are set by ``main`` once it knows which broker and Redis it talks to (``meter_for``).
METER = CpuMeter({})


def measured_target(settings: Settings) -> Target:
    """``bench.cpu.target``, or, when the management API's overview fails (a node whose
    statistics agent crashed answers 500 there), the broker found by its local port alone,
    its version and node unknown: the CPU figures stay right, the report says what is missing."""
    try:
        return target(settings)
    except requests.HTTPError as exc:
        say(f"management API overview failed ({exc}); measuring the broker on the AMQP port alone")
        broker_url = first_url(settings.broker_url)
        return Target(
            broker_url=safe_url(broker_url),
            management_url=first_url(settings.management_url).rstrip("/"),
            version="? (management overview failed)",
            node=os.environ.get("EBB_TEST_RABBITMQ_NODE", "?"),
            amqp_port=local_port(broker_url),
            redis_url=safe_url(settings.redis_url),
            redis_port=local_port(settings.redis_url),
        )


#: ``x-expires`` of every job queue the bench declares: what a Ctrl-C strands goes away soon.
BENCH_TTL = timedelta(minutes=10)
TARGET_THROUGHPUT = 0.8
TARGET_LATENCY = 1.3
TARGET_BROKER_CPU = 1.3
TARGET_ASYNC_THROUGHPUT = 1.0
PARAMS: dict[str, Any] = {"x": 1}


@dataclass(frozen=True)
class Stats:
    """One measurement: ``jobs`` done in ``seconds``, with per-job latencies when run one by one."""

    jobs: int
    seconds: float
    median_ms: float | None = None
    p99_ms: float | None = None
    #: CPU milliseconds per job by process group (rabbitmq, worker, client, redis), from /proc.
    cpu_ms: dict[str, float] = field(default_factory=dict)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "jobs_per_s": self.jobs_per_s}

    @staticmethod
    def combined(rounds: list[Stats]) -> Stats:
        """Rounds of one in-flight measurement as one: total jobs over total time, CPU per job."""
        jobs = sum(r.jobs for r in rounds)
        groups = {g for r in rounds for g in r.cpu_ms}
        cpu = {g: sum(r.cpu_ms.get(g, 0.0) * r.jobs for r in rounds) / jobs for g in sorted(groups)}
        return Stats(jobs, sum(r.seconds for r in rounds), cpu_ms=cpu)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest rank: always a latency that was really observed."""
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def sequential(run_one: Callable[[], None], n: int, warmup: int) -> Stats:
    """Run ``run_one`` n times in a row, after ``warmup`` untimed runs; jobs/s is n / total time."""
    for _ in range(warmup):
        run_one()
    samples: list[float] = []
    METER.start()
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        run_one()
        samples.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    cpu = METER.per_job(n)
    samples.sort()
    return Stats(n, total, statistics.median(samples) * 1e3, percentile(samples, 0.99) * 1e3, cpu)


async def sequential_async(run_one: Callable[[], Awaitable[None]], n: int, warmup: int) -> Stats:
    """``sequential`` for a coroutine: n awaits in a row on the running loop."""
    for _ in range(warmup):
        await run_one()
    samples: list[float] = []
    METER.start()
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        await run_one()
        samples.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    cpu = METER.per_job(n)
    samples.sort()
    return Stats(n, total, statistics.median(samples) * 1e3, percentile(samples, 0.99) * 1e3, cpu)


async def in_flight_async(run_one: Callable[[], Awaitable[None]], n: int, warmup: int) -> Stats:
    """n coroutines at once (``asyncio.gather``): timed from the first submit to the last result."""
    await asyncio.gather(*(run_one() for _ in range(warmup)))
    METER.start()
    start = time.perf_counter()
    await asyncio.gather(*(run_one() for _ in range(n)))
    seconds = time.perf_counter() - start
    return Stats(n, seconds, cpu_ms=METER.per_job(n))


def in_flight(send: Callable[[], T], collect: Callable[[T], None], n: int, warmup: int) -> Stats:
    """Send n jobs, then collect them all: timed from the first send to the last collect."""
    for handle in [send() for _ in range(warmup)]:
        collect(handle)
    METER.start()
    start = time.perf_counter()
    handles = [send() for _ in range(n)]
    for handle in handles:
        collect(handle)
    seconds = time.perf_counter() - start
    return Stats(n, seconds, cpu_ms=METER.per_job(n))


@dataclass
class Tracker:
    """Everything this run puts on the broker, so that nothing outlives it (Ctrl-C included)."""

    job_ids: set[uuid.UUID] = field(default_factory=set)  # every job ever started
    open_jobs: set[uuid.UUID] = field(default_factory=set)  # whose queues may still exist
    task_queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)

    def opened(self, job_id: uuid.UUID) -> None:
        self.job_ids.add(job_id)
        self.open_jobs.add(job_id)

    def closed(self, job_id: uuid.UUID) -> None:
        self.open_jobs.discard(job_id)


# --- 1. raw three-queue churn ----------------------------------------------------------------


def raw_churn(settings: Settings, track: Tracker, n: int, warmup: int) -> Stats:
    """The floor under Ebb's reply queues: what RabbitMQ needs to create, use and drop three queues."""
    with Connection(settings.broker_url, connect_timeout=10) as connection:
        channel = connection.channel()
        producer = Producer(channel, auto_declare=False)

        def one_job() -> None:
            job_id = uuid.uuid4()
            track.opened(job_id)
            queues = [contract.job_queue(job_id, kind, BENCH_TTL)(channel) for kind in sorted(QueueKind)]
            for queue in queues:
                queue.declare()
            for queue in queues:
                producer.publish(
                    contract.encode({"job_id": str(job_id), "queue": queue.name}),
                    exchange="",
                    routing_key=queue.name,
                    delivery_mode=2,
                    content_type=contract.CONTENT_TYPE,
                    content_encoding="utf-8",
                )
            for queue in queues:
                deadline = time.monotonic() + 10
                while (message := queue.get(no_ack=False)) is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"message published to {queue.name} never arrived")
                message.ack()
            for queue in queues:
                queue.delete()
            track.closed(job_id)

        return sequential(one_job, n, warmup)


def lean_churn(settings: Settings, track: Tracker, n: int, warmup: int) -> Stats:
    """The lean floor: what three queues cost RabbitMQ at least (transient, pushed, not polled)."""
    with Connection(settings.broker_url, connect_timeout=10) as connection:
        channel = connection.channel()
        received: list[Any] = []

        def one_job() -> None:
            job_id = uuid.uuid4()
            track.opened(job_id)
            names = [contract.queue_name(job_id, kind) for kind in sorted(QueueKind)]
            for kind in sorted(QueueKind):
                contract.job_queue(job_id, kind, BENCH_TTL).queue_declare(channel=channel)
            for name in names:
                channel.basic_publish(
                    amqp.Message(contract.encode({"queue": name}), content_type=contract.CONTENT_TYPE),
                    exchange="",
                    routing_key=name,
                )
            tags = [channel.basic_consume(name, callback=received.append) for name in names]
            deadline = time.monotonic() + 10
            while len(received) < len(names):
                if time.monotonic() > deadline:
                    raise RuntimeError("a lean-churn message never arrived")
                connection.drain_events(timeout=10)
            for message in received:
                channel.basic_ack(message.delivery_info["delivery_tag"])
            received.clear()
            for tag in tags:
                channel.basic_cancel(tag)
            for name in names:
                channel.queue_delete(name)
            track.closed(job_id)

        return sequential(one_job, n, warmup)


# --- workers -----------------------------------------------------------------------------------


def wait_ready(proc: subprocess.Popen[bytes], log: Path, check: Callable[[float], bool]) -> None:
    """A first job round trip proves the worker consumes its queue; ``check(timeout)`` waits for it."""
    deadline = time.monotonic() + 90
    while not check(1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker pid {proc.pid} did not become ready; its log ends:\n{tail}")


# --- 2. bare Celery ----------------------------------------------------------------------------


def bare_celery(
    queue: str, proc: subprocess.Popen[bytes], log: Path, n_seq: int, n_flight: int, warmup: int
) -> tuple[Stats, Stats]:
    """Plain ``apply_async().get()`` with Redis results: the Celery part of Ebb's cost, alone."""
    from bench import celery_baseline  # after main() made the repository root importable

    task = celery_baseline.echo

    def send() -> Any:
        return task.apply_async(args=[PARAMS], queue=queue)

    def collect(result: Any) -> None:
        if result.get(timeout=120) != PARAMS:
            raise RuntimeError(f"task {result.id} returned something else than its argument")

    first = send()

    def check(timeout: float) -> bool:
        try:
            first.get(timeout=timeout)
        except CeleryTimeoutError:
            return False
        return True

    wait_ready(proc, log, check)
    say(f"bare Celery: {n_seq} sequential")
    seq = sequential(lambda: collect(send()), n_seq, warmup)
    say(f"bare Celery: {n_flight} in flight")
    return seq, in_flight(send, collect, n_flight, warmup * 5)


# --- 3. Ebb ------------------------------------------------------------------------------------


def ebb(
    client: JobClient,
    track: Tracker,
    three: bool,
    n_seq: int,
    n_flight: int,
    warmup: int,
    calls: Counter[str] | None = None,
) -> tuple[Stats | None, Stats, Counter[str]]:
    """Ebb end to end: submit ``demo.echo``, wait until ``on_finished`` ran and the queues are gone.

    With ``n_seq`` 0 only the in-flight round runs (the second sync round of (d)).
    """
    calls = Counter() if calls is None else calls  # "jobs" counts submissions, the rest callback runs

    def count(name: str) -> Callable[[Job, object], None]:
        def callback(job: Job, update: object) -> None:
            calls[name] += 1

        return callback

    def send() -> Job:
        with INTERRUPTS:
            job = client.submit_job(
                "demo.echo",
                PARAMS,
                on_finished=count("on_finished"),
                on_progress=count("on_progress") if three else None,
                on_status=count("on_status") if three else None,
                auto_cleanup_after_ttl=BENCH_TTL,
            )
            track.opened(job.id)
        calls["jobs"] += 1
        return job

    def collect(job: Job) -> None:
        result = client.wait(job, timeout=120)
        track.closed(job.id)
        if not result.succeeded or result.output != PARAMS:
            raise RuntimeError(f"job {job.id} ended {result.status} with {result.output!r}")

    label = "three queues" if three else "result queue"
    seq = None
    if n_seq:
        say(f"Ebb, {label}: {n_seq} sequential")
        seq = sequential(lambda: collect(send()), n_seq, warmup)
    say(f"Ebb, {label}: {n_flight} in flight")
    flight = in_flight(send, collect, n_flight, warmup * 5)
    return seq, flight, calls


async def ebb_async(
    settings: Settings, track: Tracker, n_seq: int, n_flight: int, warmup: int, rounds: int
) -> tuple[Stats, list[Stats], Counter[str]]:
    """Ebb's three-queue jobs from ``AsyncJobClient`` (coroutine callbacks), on the loop of this
    process: a sequential run, then ``rounds`` in-flight rounds back to back."""
    calls: Counter[str] = Counter()

    def count(name: str) -> Callable[[Job, object], Awaitable[None]]:
        async def callback(job: Job, update: object) -> None:
            calls[name] += 1

        return callback

    async with AsyncJobClient(settings=settings) as client:

        async def one() -> None:
            with INTERRUPTS:
                job = await client.submit_job(
                    "demo.echo",
                    PARAMS,
                    on_finished=count("on_finished"),
                    on_progress=count("on_progress"),
                    on_status=count("on_status"),
                    auto_cleanup_after_ttl=BENCH_TTL,
                )
                track.opened(job.id)
            calls["jobs"] += 1
            result = await client.wait(job, timeout=120)
            track.closed(job.id)
            if not result.succeeded or result.output != PARAMS:
                raise RuntimeError(f"job {job.id} ended {result.status} with {result.output!r}")

        say(f"Ebb async, three queues: {n_seq} sequential")
        seq = await sequential_async(one, n_seq, warmup)
        flights = []
        for i in range(rounds):
            say(f"Ebb async, three queues: {n_flight} in flight (asyncio.gather), round {i + 1}/{rounds}")
            flights.append(await in_flight_async(one, n_flight, warmup * 5))
    return seq, flights, calls


def ebb_ready(client: JobClient, track: Tracker) -> Callable[[float], bool]:
    """The readiness check for the Ebb worker: it advertises its workflows, then one job comes back."""
    submitted: list[Job] = []

    def check(timeout: float) -> bool:
        if not submitted:
            try:
                with INTERRUPTS:
                    job = client.submit_job("demo.echo", {}, auto_cleanup_after_ttl=BENCH_TTL)
                    track.opened(job.id)
            except UnknownWorkflowError:  # not advertised yet: the worker is still starting
                time.sleep(min(timeout, 0.2))
                return False
            submitted.append(job)
        try:
            client.wait(submitted[0], timeout=timeout)
        except TimeoutError:
            return False
        track.closed(submitted[0].id)
        return True

    return check


# --- cleanup and report ----------------------------------------------------------------------


def cleanup(settings: Settings, track: Tracker) -> None:
    """Delete this run's task queues, their exchanges and the reply queues of unfinished jobs."""
    names = [contract.queue_name(j, kind) for j in sorted(track.open_jobs) for kind in QueueKind]
    delete_from_broker(settings.broker_url, [*track.task_queues, *names], track.exchanges)
    if names:
        say(f"deleted the queues of {len(track.open_jobs)} unfinished jobs")
    track.open_jobs.clear()


def ratios(stats: dict[str, Stats]) -> dict[str, dict[str, float | bool]]:
    """The three targets, for result-only and for three-queue jobs, against the lean churn."""
    lean, celery = stats["lean_churn"], stats["celery_seq"]
    assert lean.median_ms is not None and celery.median_ms is not None
    out: dict[str, dict[str, float | bool]] = {}
    for variant in ("result", "three"):
        seq_median = stats[f"ebb_{variant}_seq"].median_ms
        assert seq_median is not None
        flight = stats[f"ebb_{variant}_flight"]
        throughput = flight.jobs_per_s / lean.jobs_per_s
        latency = seq_median / (celery.median_ms + lean.median_ms)
        broker = flight.cpu_ms.get("rabbitmq", 0.0) / max(lean.cpu_ms.get("rabbitmq", 0.0), 1e-9)
        out[variant] = {
            "throughput_ratio": throughput,
            "throughput_pass": throughput >= TARGET_THROUGHPUT,
            "latency_ratio": latency,
            "latency_pass": latency <= TARGET_LATENCY,
            "broker_cpu_ratio": broker,
            "broker_cpu_pass": broker <= TARGET_BROKER_CPU,
        }
    speedup = stats["ebb_async_three_flight"].jobs_per_s / stats["ebb_three_flight"].jobs_per_s
    out["async_vs_sync"] = {
        "throughput_ratio": speedup,
        "throughput_pass": speedup >= TARGET_ASYNC_THROUGHPUT,
    }
    return out


def table(stats: dict[str, Stats], targets: dict[str, dict[str, float | bool]], meta: dict[str, Any]) -> str:
    """The human-readable report."""
    flight, load = meta["jobs_in_flight"], meta["load_avg_1min"]
    rows = [
        ("raw_churn", "raw three-queue churn, sequential"),
        ("lean_churn", "lean three-queue churn, sequential"),
        ("celery_seq", "bare Celery, sequential apply_async().get()"),
        ("celery_flight", f"bare Celery, {flight} in flight"),
        ("ebb_result_seq", "Ebb, result queue only, sequential"),
        ("ebb_result_flight", f"Ebb, result queue only, {flight} in flight"),
        ("ebb_three_seq", "Ebb, all three queues, sequential"),
        ("ebb_three_flight", f"Ebb, all three queues, {flight} in flight x2"),
        ("ebb_async_three_seq", "Ebb async, all three queues, sequential"),
        ("ebb_async_three_flight", f"Ebb async, all three queues, {flight} in flight x2"),
    ]

    calls = meta["three_queue_callbacks"]
    per_job = ", ".join(
        f"{name} {calls.get(name, 0) / max(1, calls.get('jobs', 0)):.2f}"
        for name in ("on_finished", "on_status", "on_progress")
    )

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"Ebb benchmark: RabbitMQ {meta['rabbitmq']}, {meta['cores']} cores, workers -c 2 prefork, "
        f"{meta['sequential']} sequential samples, {flight} in flight",
        f"measured: {meta['broker_described']}",
        f"worker toggles (bench/toggled_worker.py): {meta['worker_toggles'] or 'none'}",
        f"load average (1 min) before {load['before']:.2f}, after {load['after']:.2f} "
        "(other work on the machine skews every row)",
        "",
        f"{'measurement':<48}{'median ms':>10}{'p99 ms':>10}{'jobs/s':>10}",
    ]
    for key, label in rows:
        s = stats[key]
        lines.append(f"{label:<48}{ms(s.median_ms):>10}{ms(s.p99_ms):>10}{s.jobs_per_s:>10.1f}")
    lines += ["", "(jobs/s of a sequential row = samples / total time, i.e. one job at a time)", ""]
    groups = list(METER.groups)
    lines.append(
        f"{'CPU ms per job (from /proc)':<48}" + "".join(f"{g:>10}" for g in groups) + f"{'total':>10}"
    )
    for key, label in rows:
        cpu = stats[key].cpu_ms
        row = "".join(f"{cpu.get(g, 0.0):>10.2f}" for g in groups)
        lines.append(f"{label:<48}{row}{sum(cpu.values()):>10.2f}")
    lines.append("")
    lines.append(f"{'target':<48}{'result queue only':>20}{'all three queues':>20}")
    for name, label in (
        ("throughput", f"(a) Ebb in flight / lean churn, jobs/s >= {TARGET_THROUGHPUT}"),
        ("latency", f"(b) Ebb median / (Celery + lean churn) <= {TARGET_LATENCY}"),
        ("broker_cpu", f"(c) RabbitMQ CPU, Ebb / lean churn <= {TARGET_BROKER_CPU}"),
    ):
        cells = [
            f"{targets[v][name + '_ratio']:.2f} {'PASS' if targets[v][name + '_pass'] else 'FAIL'}"
            for v in ("result", "three")
        ]
        lines.append(f"{label:<48}{cells[0]:>20}{cells[1]:>20}")
    speedup = targets["async_vs_sync"]
    label = f"(d) async / sync throughput (three queues, in flight) >= {TARGET_ASYNC_THROUGHPUT}"
    cell = f"{speedup['throughput_ratio']:.2f} {'PASS' if speedup['throughput_pass'] else 'FAIL'}"
    lines.append(f"{label:<68}{cell:>20}")
    async_calls = meta["async_three_queue_callbacks"]
    async_per_job = ", ".join(
        f"{name} {async_calls.get(name, 0) / max(1, async_calls.get('jobs', 0)):.2f}"
        for name in ("on_finished", "on_status", "on_progress")
    )
    lines += [
        "",
        f"callbacks per three-queue job (demo.echo: RUNNING and the final status, 1 progress): {per_job}",
        f"  the same from the async client (coroutine callbacks): {async_per_job}",
        leftover_line(meta["leftover_ours"], meta["leftover_others"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement in order, one worker at a time, so they never compete for the cores."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in flight for throughput (1000)")
    parser.add_argument("--seq", type=int, default=300, help="sequential samples per latency run (300)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 in flight, 30 sequential")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument(
        "--worker-toggles",
        default="",
        metavar="NAMES",
        help="run Ebb's worker as bench.toggled_worker with these steps switched (comma separated, "
        "e.g. transient_result), to compare a step on and off in one sitting",
    )
    args = parser.parse_args(argv)
    n_flight, n_seq, warmup = (100, 30, 5) if args.quick else (args.jobs, args.seq, 20)
    if n_flight < 1 or n_seq < 1:
        parser.error("--jobs and --seq must be at least 1")

    INTERRUPTS.install()
    if str(ROOT) not in sys.path:  # run as ``python bench/bench_jobs.py``: find ``bench`` too
        sys.path.insert(0, str(ROOT))
    base = Settings.from_env()
    # Figures only compare across runs on the same broker: say which one, and read its CPU only.
    measured = measured_target(base)
    METER.groups = meter_for(measured)
    say(f"measuring {measured.describe()}")
    run = uuid.uuid4().hex[:8]
    track = Tracker()
    logs = Path(tempfile.mkdtemp(prefix="ebb-bench-"))
    stats: dict[str, Stats] = {}
    calls: Counter[str] = Counter()
    async_calls: Counter[str] = Counter()
    load_before = os.getloadavg()[0]
    try:
        say(f"raw three-queue churn: {n_seq} jobs")
        stats["raw_churn"] = raw_churn(base, track, n_seq, warmup)
        say(f"lean three-queue churn: {n_seq} jobs")
        stats["lean_churn"] = lean_churn(base, track, n_seq, warmup)

        celery_queue = f"bench.celery.{run}"
        track.task_queues.append(celery_queue)
        track.exchanges.append(celery_queue)  # Celery creates a direct exchange per missing queue
        log = logs / "celery-baseline.log"
        with worker(
            "bench.celery_baseline",
            f"bench-celery-{run}@%h",
            dict(os.environ),
            log,
            say,
            ["-Q", celery_queue],
        ) as proc:
            stats["celery_seq"], stats["celery_flight"] = bare_celery(
                celery_queue, proc, log, n_seq, n_flight, warmup
            )

        settings = dataclasses.replace(base, task_queue=f"bench.ebb.{run}")
        track.task_queues.append(settings.task_queue)
        track.exchanges.append(settings.task_queue)  # Celery's default exchange for it, same name
        track.task_queues.append(f"{settings.task_queue}.audit")  # the worker declares and reads it too
        log = logs / "ebb-worker.log"
        env = {**os.environ, "EBB_TASK_QUEUE": settings.task_queue, "EBB_BENCH_TOGGLES": args.worker_toggles}
        app = "bench.toggled_worker" if args.worker_toggles else "tasks"
        with worker(app, f"bench-ebb-{run}@%h", env, log, say) as proc:
            with JobClient(settings=settings) as client:
                wait_ready(proc, log, ebb_ready(client, track))
                result_seq, stats["ebb_result_flight"], _ = ebb(client, track, False, n_seq, n_flight, warmup)
                three_seq, sync_first, calls = ebb(client, track, True, n_seq, n_flight, warmup)
            assert result_seq is not None and three_seq is not None
            stats["ebb_result_seq"], stats["ebb_three_seq"] = result_seq, three_seq
            # (d) in ABBA order (sync, async, async, sync) on the same worker, so that a drift of
            # the machine or the broker over the run weighs on both clients alike. One client is
            # open at a time: this process's CPU is that client's.
            stats["ebb_async_three_seq"], async_rounds, async_calls = asyncio.run(
                ebb_async(settings, track, n_seq, n_flight, warmup, rounds=2)
            )
            with JobClient(settings=settings) as client:
                _, sync_second, _ = ebb(client, track, True, 0, n_flight, warmup, calls)
            stats["ebb_three_flight"] = Stats.combined([sync_first, sync_second])
            stats["ebb_async_three_flight"] = Stats.combined(async_rounds)
    except KeyboardInterrupt:
        say(f"interrupted; deleting this run's queues (workers are stopped); worker logs kept in {logs}")
        return 130
    except BaseException:
        say(f"failed; worker logs kept in {logs}")
        raise
    finally:
        cleanup(base, track)

    ours, others = leftover_queues(base, measured.management_url, track.task_queues, track.job_ids, 10)
    meta: dict[str, Any] = {
        **broker_meta(measured, load_before),
        "sequential": n_seq,
        "jobs_in_flight": n_flight,
        "warmup": warmup,
        "three_queue_callbacks": dict(calls),
        "async_three_queue_callbacks": dict(async_calls),
        "leftover_ours": ours,
        "leftover_others": others,
        "worker_toggles": args.worker_toggles,
    }
    targets = ratios(stats)
    report = table(stats, targets, meta)
    if args.json:
        print(report, file=sys.stderr)
        print(
            json.dumps(
                {"meta": meta, "results": {k: s.to_dict() for k, s in stats.items()}, "targets": targets},
                indent=2,
            )
        )
    else:
        print(report)
    remove_logs(logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
