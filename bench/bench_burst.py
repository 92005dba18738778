"""10,000 jobs submitted at once from one caller: is its memory bounded by the jobs in flight,
and is every result delivered, exactly once? (Target (d) of issue 22.)

For each client kind, one caller in this process submits N ``demo.echo`` jobs at once against
real Celery workers (prefork ``-c 2``) on the broker of EBB_BROKER_URL (EBB_MANAGEMENT_URL must
be the same node; EBB_REDIS_URL's Redis for the registry):

- ``JobClient``: a loop of ``submit_job(..., on_finished=callback)`` with no wait in between,
  then a wait until every ``on_finished`` ran (and ``wait()`` for the last job only: outcomes
  stay available to it for the last ``EBB_KEEP_RESULTS`` jobs, by design, and a burst is bigger);
- ``AsyncJobClient``: ``asyncio.gather`` of N coroutines, each ``submit_job`` (with a coroutine
  ``on_finished``) then ``wait()``.

Each kind runs a small warm-up burst, then ``--rounds`` (2) measured bursts on one client.
While a burst is submitted the worker is held off the task queue (Celery's remote control,
``cancel_consumer`` then ``add_consumer`` once the last submit returned; ``--no-hold`` lets it
run): a sync caller waits for each submit's confirm, so a free worker keeps up with it and only a
few dozen jobs are ever in flight, too few to weigh one; held, all N are. A thread samples this
process's RSS (``/proc/self/status``) every 0.2 s with the jobs in flight then (``submit_job``
called, ``on_finished`` not yet run), and ``VmHWM`` (reset through ``/proc/self/clear_refs``
before each round) gives the exact peak. Reported per round: RSS before, peak, after (garbage
collected) and after ``malloc_trim(0)`` (freed memory handed back: what is still in use, plus
the allocator's fragmentation), Python's allocated blocks (``sys.getallocatedblocks``: every
Python object, nothing else), KB per in-flight job = (peak - before) / peak in flight, jobs/s
(first submit to last result), CPU per job by process (RabbitMQ, the worker and its pool, this
client, Redis; from /proc), and what the client still holds once a round is over.

Checked, per client kind (PASS/FAIL):

  (1) delivered: every job's ``on_finished`` ran exactly once, with its own params echoed
      (duplicates, missing and wrong results are counted; any of them: exit code 1);
  (2) nothing kept per finished job: once a round is over the client holds no job, no
      consumer, no timer or task, no unsettled task or owed delete, and at most
      ``EBB_KEEP_RESULTS`` kept outcomes (by design, for a later ``wait()``): the same after
      every round;
  (3) no growth per finished job, last round against the first: allocated blocks
      <= GROWTH_BLOCKS_PER_JOB and trimmed RSS <= GROWTH_BYTES_PER_JOB per job of the rounds
      after the first;
  (4) bounded by jobs in flight: (peak - before) / peak in flight <= KB_PER_JOB_IN_FLIGHT.

The thresholds, from what this bench measured (2 shared cores, N = 10,000 and 1,000,
RabbitMQ 3.10.8 and 4.3.6): one object kept per finished job would be at least one block per
job, so (3) allows half of one (measured 0.26-0.42); ``tests/test_memory.py`` holds a
long-lived caller to 512 bytes of RSS per job, and so does (3) (measured 361 bytes for the sync
client; the async one's trimmed RSS rose 12 MB in its second round of 10,000 with its blocks
flat: memory outside Python's allocator, its 10,000 tasks and coroutine frames, left fragmented;
at N = 1,000 either client's second round adds 2-3 MB this way, so (3) is meant for N = 10,000).
(4) is three times the worst measured (4.0-5.1 KB per job in flight, either client: a watch,
its tracker, the AMQP consumer, and for the async client the caller's own coroutine and task).

Run from anywhere (the worker starts in the repository root)::

    .venv/bin/python bench/bench_burst.py [--jobs N] [--rounds 2] [--updates] [--json]
    EBB_BROKER_URL=amqp://guest:guest@127.0.0.1:5675// EBB_MANAGEMENT_URL=http://127.0.0.1:15675 \
        EBB_REDIS_URL=redis://127.0.0.1:6380/0 .venv/bin/python bench/bench_burst.py   # RabbitMQ 4.3

The table goes to stdout; with ``--json`` one JSON document goes to stdout and the table to
stderr. Progress goes to stderr. The worker runs in its own session and is always stopped;
every queue the run creates is deleted at the end (Ctrl-C included), and checked for on the
management API. Exit code 1 when a result was missing, duplicated or wrong, 2 when only a
memory target failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiormq
import requests
from celery import Celery
from kombu.connection import Connection

from ebb import Job, JobClient, JobResult, Settings, UnknownWorkflowError, contract
from ebb.aio import AsyncJobClient
from ebb.contract import QueueKind

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_burst.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import harness
from bench.cpu import CpuMeter, Target, first_url, local_port, safe_url, target
from bench.harness import INTERRUPTS, progress, worker

#: ``x-expires`` of every job queue the bench declares: what a Ctrl-C strands goes away soon.
BENCH_TTL = timedelta(minutes=15)
SAMPLE_EVERY = 0.2
GROWTH_BYTES_PER_JOB = 512
GROWTH_BLOCKS_PER_JOB = 0.5
KB_PER_JOB_IN_FLIGHT = 16.0
#: Its groups are set by ``main`` once it knows which broker and Redis it talks to (``meter_for``).
METER = CpuMeter({})
say = progress("burst")


# --- this process's memory ---------------------------------------------------------------------


def status_kb(field_name: str) -> int:
    """A ``/proc/self/status`` figure in KB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


_LIBC: Any = None


def trim() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``): RSS then is what is in use."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


@dataclass
class Counters:
    """One round's jobs: written by the caller and the client's thread or loop, read by the sampler."""

    calls: int = 0  # submit_job called
    confirmed: int = 0  # submit_job returned
    finished: int = 0  # on_finished ran (first time per job)
    peak_in_flight: int = 0
    peak_on_broker: int = 0

    @property
    def in_flight(self) -> int:
        return self.calls - self.finished

    def called(self) -> None:
        self.calls += 1
        self.peak_in_flight = max(self.peak_in_flight, self.calls - self.finished)

    def returned(self) -> None:
        self.confirmed += 1
        self.peak_on_broker = max(self.peak_on_broker, self.confirmed - self.finished)


class Sampler:
    """A thread that reads RSS and the jobs in flight every ``SAMPLE_EVERY`` seconds."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.samples: list[tuple[float, int, int]] = []  # (seconds, RSS KB, in flight)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._start, status_kb("VmRSS"), self.counters.in_flight))
            if self._stop.wait(SAMPLE_EVERY):
                return


# --- the jobs of a run, kept compact (the bench's own memory must not look like the client's) -----


class Ledger:
    """Every job of the run in preallocated arrays: 16 bytes of id and one count per job.

    Allocated before anything is measured, so that the bench's own bookkeeping never grows
    during a round. A job is named by its ``reference`` (``run:slot``); its params carry the slot.
    """

    def __init__(self, run: str, size: int) -> None:
        self.run = run
        self.size = size
        self.ids = bytearray(16 * size)
        self.submitted = bytearray(size)
        self.delivered = bytearray(size)  # on_finished runs, saturating at 255
        self.wrong = bytearray(size)
        self.next = 0

    def take(self, n: int) -> range:
        if self.next + n > self.size:
            raise RuntimeError("the ledger is full")
        slots = range(self.next, self.next + n)
        self.next += n
        return slots

    def reference(self, slot: int) -> str:
        return f"{self.run}:{slot}"

    def params(self, slot: int) -> dict[str, Any]:
        return {"bench": "burst", "run": self.run, "slot": slot}

    def submitted_as(self, slot: int, job_id: uuid.UUID) -> None:
        self.ids[16 * slot : 16 * slot + 16] = job_id.bytes
        self.submitted[slot] = 1

    def finished(self, job: Job, result: JobResult) -> int | None:
        """``on_finished``: count it against its slot; the slot, or None for a foreign job."""
        run, _, slot_text = (job.reference or "").partition(":")
        if run != self.run or not slot_text.isdigit():
            return None
        slot = int(slot_text)
        if not 0 <= slot < self.size:
            return None
        self.delivered[slot] = min(255, self.delivered[slot] + 1)
        if not result.succeeded or result.output != self.params(slot):
            self.wrong[slot] = 1
        return slot

    def job_id(self, slot: int) -> uuid.UUID | None:
        raw = bytes(self.ids[16 * slot : 16 * slot + 16])
        return None if raw == bytes(16) else uuid.UUID(bytes=raw)

    def verdict(self, slots: range) -> dict[str, int]:
        """Submitted, delivered once, missing, duplicated (ran more than once) and wrong results."""
        out = {"submitted": 0, "delivered": 0, "missing": 0, "duplicates": 0, "wrong": 0}
        for slot in slots:
            out["submitted"] += self.submitted[slot]
            count = self.delivered[slot]
            out["delivered"] += count >= 1
            out["missing"] += count == 0
            out["duplicates"] += max(0, count - 1)
            out["wrong"] += self.wrong[slot]
        return out

    def unfinished(self) -> Iterator[uuid.UUID]:
        """Jobs whose result never reached us: their queues may still exist."""
        for slot in range(self.next):
            job_id = self.job_id(slot)
            if job_id is not None and not self.delivered[slot]:
                yield job_id

    def all_ids(self) -> set[uuid.UUID]:
        return {j for slot in range(self.next) if (j := self.job_id(slot)) is not None}


class Gate:
    """Holds the worker off the task queue while a burst is submitted, so that all N jobs are in
    flight at once (Celery's remote control: ``cancel_consumer``, then ``add_consumer``, sent to
    this run's worker only). Without it the worker keeps up with a sync caller's submits (each
    waits for its confirm), and a few dozen jobs are ever in flight: too few to weigh one."""

    def __init__(self, settings: Settings, node: str, enabled: bool) -> None:
        self.enabled = enabled
        self.held = False
        self.node = node
        self.queue = settings.task_queue
        self.app = Celery("bench_burst", broker=settings.broker_url, set_as_current=False)
        self.app.conf.broker_connection_retry_on_startup = True

    def _ask(self, command: str) -> None:
        replies = self.app.control.broadcast(
            command, arguments={"queue": self.queue}, destination=[self.node], reply=True, limit=1, timeout=10
        )
        if not any(self.node in reply for reply in replies or []):
            raise RuntimeError(f"worker {self.node} did not answer {command} within 10 s: {replies!r}")

    def hold(self) -> None:
        if self.enabled and not self.held:
            self._ask("cancel_consumer")
            self.held = True

    def release(self) -> None:
        if self.held:
            self._ask("add_consumer")
            self.held = False


# --- one round ------------------------------------------------------------------------------------


@dataclass
class Round:
    """One burst of N jobs on one client, and what the process's memory did meanwhile."""

    kind: str
    label: str  # "warm-up", "1", "2", ...
    jobs: int
    seconds: float
    submit_seconds: float
    rss_before_kb: int
    rss_peak_kb: int
    rss_after_kb: int
    rss_trimmed_kb: int
    blocks_before: int
    blocks_after: int
    peak_in_flight: int
    peak_on_broker: int
    verdict: dict[str, int]
    books: dict[str, int]
    cpu_ms: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    @property
    def kb_per_job_in_flight(self) -> float:
        return (self.rss_peak_kb - self.rss_before_kb) / max(1, self.peak_in_flight)

    @property
    def delivered_ok(self) -> bool:
        v = self.verdict
        return v["delivered"] == self.jobs and not (v["missing"] or v["duplicates"] or v["wrong"])

    @staticmethod
    def ended(
        kind: str,
        label: str,
        slots: range,
        counters: Counters,
        ledger: Ledger,
        books: dict[str, int],
        box: dict[str, Any],
    ) -> Round:
        """The round of ``slots``, just over: its counters and verdict, what the client still holds
        (``books``) and what ``measured`` put in ``box``."""
        return Round(
            kind=kind,
            label=label,
            jobs=len(slots),
            peak_in_flight=counters.peak_in_flight,
            peak_on_broker=counters.peak_on_broker,
            verdict=ledger.verdict(slots),
            books=books,
            **box,
        )

    def to_dict(self, with_samples: bool) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not with_samples:
            out.pop("samples")
        out["jobs_per_s"] = self.jobs_per_s
        out["kb_per_job_in_flight"] = self.kb_per_job_in_flight
        return out


@contextlib.contextmanager
def measured(counters: Counters, n: int) -> Iterator[dict[str, Any]]:
    """Before, peak (sampler + VmHWM) and after of one round; CPU per job when it is measured."""
    gc.collect()
    trim()
    box: dict[str, Any] = {"rss_before_kb": status_kb("VmRSS"), "blocks_before": sys.getallocatedblocks()}
    exact_peak = reset_peak()
    METER.start()
    start = time.perf_counter()
    with Sampler(counters) as sampler:
        yield box
    box["seconds"] = time.perf_counter() - start
    box["cpu_ms"] = METER.per_job(n)
    peak = max(rss for _, rss, _ in sampler.samples)
    if exact_peak:
        peak = max(peak, status_kb("VmHWM"))
    box["rss_peak_kb"] = peak
    box["samples"] = sampler.samples
    gc.collect()
    box["rss_after_kb"] = status_kb("VmRSS")
    box["blocks_after"] = sys.getallocatedblocks()
    trim()
    box["rss_trimmed_kb"] = status_kb("VmRSS")


def sync_books(client: JobClient) -> dict[str, int]:
    """What a ``JobClient`` holds once its jobs are over: bounded, or a leak."""
    core_ = client._core
    channel = client._consume_channel
    return {
        "jobs": len(core_.watches),
        "kept_outcomes": len(core_.finished),
        "kept_outcome_bytes": core_.finished.bytes,
        "consumers": len(channel.callbacks) + len(channel.cancel_callbacks),
        "timers": len(client._timers),
        "unsettled_tasks": len(core_.unsettled),
        "deletes_owed": len(core_.deletes_owed),
        "confirms_outstanding": client._confirms.outstanding,
    }


def async_books(client: AsyncJobClient) -> dict[str, int]:
    """What an ``AsyncJobClient`` holds once its jobs are over (its supervisor task stays)."""
    core_ = client._core
    channel = client._consume_channel
    assert isinstance(channel, aiormq.Channel)
    return {
        "jobs": len(core_.watches),
        "kept_outcomes": len(core_.finished),
        "kept_outcome_bytes": core_.finished.bytes,
        "consumers": len(channel.consumers) + len(client._consumer_of),
        "tasks": len(client._tasks) - 1,
        "unsettled_tasks": len(core_.unsettled),
        "deletes_owed": len(core_.deletes_owed),
    }


@dataclass(frozen=True)
class Options:
    """How each round runs: three queues or one, its time bound, the worker's gate."""

    updates: bool
    timeout: float
    gate: Gate

    def submit_args(self, ledger: Ledger, slot: int, on_finished: object, ignore: object) -> dict[str, Any]:
        """``submit_job``'s keyword arguments for one slot of a round (``ignore``: the status and
        progress callback when the round asks for three queues)."""
        return {
            "on_finished": on_finished,
            "on_progress": ignore if self.updates else None,
            "on_status": ignore if self.updates else None,
            "auto_cleanup_after_ttl": BENCH_TTL,
            "reference": ledger.reference(slot),
        }


def sync_round(client: JobClient, ledger: Ledger, label: str, n: int, options: Options) -> Round:
    """N submits in a loop (no wait in between), then until every ``on_finished`` ran."""
    slots = ledger.take(n)
    counters = Counters()
    all_done = threading.Event()
    last: list[Job] = []

    def on_finished(job: Job, result: JobResult) -> None:
        slot = ledger.finished(job, result)
        if slot is not None and ledger.delivered[slot] == 1:
            counters.finished += 1
            if counters.finished == n:
                last.append(job)
                all_done.set()

    def ignore(job: Job, update: object) -> None:
        return None

    options.gate.hold()
    try:
        with measured(counters, n) as box:
            start = time.perf_counter()
            for slot in slots:
                counters.called()
                with INTERRUPTS:
                    job = client.submit_job(
                        "demo.echo",
                        ledger.params(slot),
                        **options.submit_args(ledger, slot, on_finished, ignore),
                    )
                    ledger.submitted_as(slot, job.id)
                counters.returned()
            box["submit_seconds"] = time.perf_counter() - start
            options.gate.release()
            if all_done.wait(options.timeout):
                client.wait(last[0], timeout=30)  # its burst is flushed: records written, waiters woken
            else:
                missing = n - counters.finished
                say(f"sync round {label}: {missing} of {n} results missing after {options.timeout:.0f} s")
    finally:
        options.gate.release()
    return Round.ended("sync", label, slots, counters, ledger, sync_books(client), box)


async def async_round(client: AsyncJobClient, ledger: Ledger, label: str, n: int, options: Options) -> Round:
    """``asyncio.gather`` of N coroutines, each ``submit_job`` then ``wait()``."""
    slots = ledger.take(n)
    counters = Counters()
    deadline = time.monotonic() + options.timeout
    all_submitted = asyncio.Event()
    settled = [0]  # submits that returned or raised

    async def on_finished(job: Job, result: JobResult) -> None:
        slot = ledger.finished(job, result)
        if slot is not None and ledger.delivered[slot] == 1:
            counters.finished += 1

    async def ignore(job: Job, update: object) -> None:
        return None

    async def one(slot: int) -> None:
        counters.called()
        try:
            with INTERRUPTS:
                job = await client.submit_job(
                    "demo.echo", ledger.params(slot), **options.submit_args(ledger, slot, on_finished, ignore)
                )
                ledger.submitted_as(slot, job.id)
            counters.returned()
        finally:
            settled[0] += 1
            if settled[0] == n:
                all_submitted.set()
        result = await client.wait(job, timeout=max(1.0, deadline - time.monotonic()))
        if result.output != ledger.params(slot):
            ledger.wrong[slot] = 1

    await asyncio.to_thread(options.gate.hold)
    try:
        with measured(counters, n) as box:
            start = time.perf_counter()
            gathered = asyncio.gather(*(one(slot) for slot in slots), return_exceptions=True)
            submitted = asyncio.ensure_future(all_submitted.wait())
            either: set[asyncio.Future[Any]] = {gathered, submitted}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            submitted.cancel()
            box["submit_seconds"] = time.perf_counter() - start
            await asyncio.to_thread(options.gate.release)
            errors: dict[str, int] = {}
            for outcome in await gathered:
                if isinstance(outcome, BaseException):
                    errors[type(outcome).__name__] = errors.get(type(outcome).__name__, 0) + 1
            # The gather holds its N finished tasks: gone before "after" is measured.
            del gathered, submitted, either
    finally:
        await asyncio.to_thread(options.gate.release)
    if errors:
        say(f"async round {label}: {sum(errors.values())} of {n} coroutines raised: {errors}")
    return Round.ended("async", label, slots, counters, ledger, async_books(client), box)


def report_round(r: Round) -> None:
    v = r.verdict
    say(
        f"{r.kind} round {r.label}: {r.jobs} jobs in {r.seconds:.1f} s ({r.jobs_per_s:.1f} jobs/s; submits "
        f"{r.submit_seconds:.1f} s), RSS {r.rss_before_kb / 1024:.1f} -> peak {r.rss_peak_kb / 1024:.1f} "
        f"-> {r.rss_after_kb / 1024:.1f} (trimmed {r.rss_trimmed_kb / 1024:.1f}) MB, peak in flight "
        f"{r.peak_in_flight} (on the broker {r.peak_on_broker}), delivered {v['delivered']}, missing "
        f"{v['missing']}, duplicates {v['duplicates']}, wrong {v['wrong']}; holds {r.books}"
    )


def labels(rounds: int) -> list[str]:
    return ["warm-up", *(str(i + 1) for i in range(rounds))]


def run_sync(
    settings: Settings, ledger: Ledger, n: int, rounds: int, warmup: int, options: Options
) -> list[Round]:
    out = []
    with JobClient(settings=settings) as client:
        for label in labels(rounds):
            size = warmup if label == "warm-up" else n
            say(f"sync round {label}: {size} jobs submitted in a loop")
            out.append(sync_round(client, ledger, label, size, options))
            report_round(out[-1])
    return out


async def run_async(
    settings: Settings, ledger: Ledger, n: int, rounds: int, warmup: int, options: Options
) -> list[Round]:
    out = []
    async with AsyncJobClient(settings=settings) as client:
        for label in labels(rounds):
            size = warmup if label == "warm-up" else n
            say(f"async round {label}: {size} jobs through asyncio.gather")
            out.append(await async_round(client, ledger, label, size, options))
            report_round(out[-1])
    return out


# --- the worker -------------------------------------------------------------------------------------


def wait_ready(settings: Settings, ledger: Ledger, proc: subprocess.Popen[bytes], log: Path) -> None:
    """The worker advertises its workflows, then one job comes back (on a client of its own)."""
    deadline = time.monotonic() + 90
    slot = ledger.take(1)[0]
    with JobClient(settings=settings) as client:
        job: Job | None = None
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"worker pid {proc.pid} did not become ready; its log ends:\n{tail}")
            if job is None:
                try:
                    with INTERRUPTS:
                        job = client.submit_job(
                            "demo.echo",
                            ledger.params(slot),
                            auto_cleanup_after_ttl=BENCH_TTL,
                            reference=ledger.reference(slot),
                        )
                        ledger.submitted_as(slot, job.id)
                except UnknownWorkflowError:  # not advertised yet: the worker is still starting
                    time.sleep(0.2)
                    continue
            try:
                result = client.wait(job, timeout=1.0)
            except TimeoutError:
                continue
            ledger.finished(job, result)
            return


# --- cleanup and report ---------------------------------------------------------------------------


def find_target(settings: Settings) -> Target:
    """``bench.cpu.target``; when the management API cannot describe the node (RabbitMQ 4.3 here
    answered 500 to ``/api/overview`` after its queues had run out of file descriptors), the
    broker's version and node from the AMQP handshake instead, said so on stderr."""
    try:
        return target(settings)
    except requests.HTTPError as exc:
        say(f"the management API cannot describe the node ({exc}); naming it from the AMQP handshake")
    broker_url = first_url(settings.broker_url)
    with Connection(broker_url, connect_timeout=10) as connection:
        connection.connect()
        server = connection.connection.server_properties
    return Target(
        broker_url=safe_url(broker_url),
        management_url=first_url(settings.management_url).rstrip("/"),
        version=str(server.get("version", "?")),
        node=f"{server.get('cluster_name', '?')} (from the AMQP handshake)",
        amqp_port=local_port(broker_url),
        redis_url=safe_url(settings.redis_url),
        redis_port=local_port(settings.redis_url),
    )


def worker_queues(settings: Settings) -> list[str]:
    """The queues this run's worker reads: the task queue and the audit's (``tasks.install``)."""
    return [settings.task_queue, f"{settings.task_queue}.audit"]


def cleanup(settings: Settings, ledger: Ledger) -> None:
    """Delete the worker's queues, the task queue's exchange, and the reply queues of jobs whose
    result never came."""
    names = [contract.queue_name(j, kind) for j in ledger.unfinished() for kind in QueueKind]
    harness.delete_from_broker(settings.broker_url, [*worker_queues(settings), *names], [settings.task_queue])
    if names:
        say(f"deleted the queues of {len(names) // len(QueueKind)} unfinished jobs")


def targets(rounds: list[Round], keep_results: int) -> dict[str, dict[str, Any]]:
    """The four checks of the docstring, per client kind, over its measured rounds."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("sync", "async"):
        measured_rounds = [r for r in rounds if r.kind == kind and r.label != "warm-up"]
        if not measured_rounds:
            continue
        first, last = measured_rounds[0], measured_rounds[-1]
        n = sum(r.jobs for r in measured_rounds[1:]) or first.jobs
        growth = (last.rss_trimmed_kb - first.rss_trimmed_kb) * 1024 / n
        blocks = (last.blocks_after - first.blocks_after) / n
        kb_in_flight = max(r.kb_per_job_in_flight for r in measured_rounds)
        held = [{k: v for k, v in r.books.items() if k != "kept_outcome_bytes"} for r in measured_rounds]
        books_ok = all(
            b["kept_outcomes"] <= keep_results
            and all(v == 0 for k, v in b.items() if k != "kept_outcomes")
            and b == held[0]
            for b in held
        )
        out[kind] = {
            "delivered_pass": all(r.delivered_ok for r in measured_rounds),
            "books_pass": books_ok,
            "growth_bytes_per_job": growth,
            "growth_blocks_per_job": blocks,
            "growth_pass": growth <= GROWTH_BYTES_PER_JOB and blocks <= GROWTH_BLOCKS_PER_JOB,
            "kb_per_job_in_flight": kb_in_flight,
            "in_flight_pass": kb_in_flight <= KB_PER_JOB_IN_FLIGHT,
        }
    return out


def table(rounds: list[Round], checks: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    load = meta["load_avg_1min"]
    lines = [
        f"Ebb burst benchmark: RabbitMQ {meta['rabbitmq']}, {meta['cores']} cores, worker -c 2 prefork, "
        f"{meta['jobs']} jobs at once per round, {meta['queues_per_job']} per job, "
        f"EBB_KEEP_RESULTS {meta['keep_results']}; the worker "
        + (
            "held off the task queue until the last submit returned"
            if meta["worker_held_while_submitting"]
            else "running while the burst is submitted"
        ),
        f"measured: {meta['broker_described']}",
        f"load average (1 min) before {load['before']:.2f}, after {load['after']:.2f} "
        "(other work on the machine skews jobs/s and CPU)",
        "",
        f"{'client round':<16}{'jobs':>7}{'jobs/s':>8}{'submit s':>9}{'in flight':>10}"
        f"{'RSS MB before':>14}{'peak':>8}{'after':>8}{'trimmed':>8}{'KB/job':>8}"
        f"{'blocks +':>10}{'delivered':>10}{'dup':>5}{'missing':>8}{'wrong':>6}",
    ]
    for r in rounds:
        v = r.verdict
        lines.append(
            f"{r.kind + ' ' + r.label:<16}{r.jobs:>7}{r.jobs_per_s:>8.1f}{r.submit_seconds:>9.1f}"
            f"{r.peak_in_flight:>10}{r.rss_before_kb / 1024:>14.1f}{r.rss_peak_kb / 1024:>8.1f}"
            f"{r.rss_after_kb / 1024:>8.1f}{r.rss_trimmed_kb / 1024:>8.1f}{r.kb_per_job_in_flight:>8.2f}"
            f"{r.blocks_after - r.blocks_before:>10}{v['delivered']:>10}{v['duplicates']:>5}"
            f"{v['missing']:>8}{v['wrong']:>6}"
        )
    lines += [
        "",
        "(in flight: submit_job called, on_finished not yet run; KB/job = (peak - before) / peak in "
        "flight; trimmed: after gc and malloc_trim; blocks +: Python's allocated blocks after - before)",
        "",
    ]
    groups = list(METER.groups)
    lines.append(
        f"{'CPU ms per job (from /proc)':<32}" + "".join(f"{g:>10}" for g in groups) + f"{'total':>10}"
    )
    for r in rounds:
        if r.label == "warm-up":
            continue
        row = "".join(f"{r.cpu_ms.get(g, 0.0):>10.2f}" for g in groups)
        lines.append(f"{r.kind + ' round ' + r.label:<32}{row}{sum(r.cpu_ms.values()):>10.2f}")
    lines.append("")
    lines.append("held once each round was over:")
    for r in rounds:
        lines.append(f"  {r.kind + ' ' + r.label:<14}" + ", ".join(f"{k} {v}" for k, v in r.books.items()))
    lines.append("")

    def cell(ok: bool, text: str) -> str:
        return f"{text} {'PASS' if ok else 'FAIL'}"

    kinds = list(checks)
    lines.append(f"{'target':<70}" + "".join(f"{k:>22}" for k in kinds))
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        (
            "(1) every result delivered exactly once, the right one",
            lambda c: cell(c["delivered_pass"], "all" if c["delivered_pass"] else "no"),
        ),
        (
            f"(2) held after each round: no job/consumer/task, <= {meta['keep_results']} outcomes",
            lambda c: cell(c["books_pass"], "same" if c["books_pass"] else "grew"),
        ),
        (
            f"(3) trimmed RSS growth, last - first round <= {GROWTH_BYTES_PER_JOB} B/job",
            lambda c: cell(c["growth_pass"], f"{c['growth_bytes_per_job']:.0f} B"),
        ),
        (
            f"    allocated blocks growth <= {GROWTH_BLOCKS_PER_JOB} per job",
            lambda c: cell(c["growth_pass"], f"{c['growth_blocks_per_job']:.3f}"),
        ),
        (
            f"(4) (peak - before) / peak in flight <= {KB_PER_JOB_IN_FLIGHT:g} KB",
            lambda c: cell(c["in_flight_pass"], f"{c['kb_per_job_in_flight']:.2f} KB"),
        ),
    ]
    for label, render in rows:
        lines.append(f"{label:<70}" + "".join(f"{render(checks[k]):>22}" for k in kinds))
    lines += [
        "",
        harness.leftover_line(meta["leftover_ours"], meta["leftover_others"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs submitted at once per round (10000)")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds per client kind (2)")
    parser.add_argument("--warmup", type=int, default=200, help="jobs of the unmeasured first burst (200)")
    parser.add_argument(
        "--kinds", default="sync,async", help="client kinds, in order: sync, async or both (sync,async)"
    )
    parser.add_argument("--updates", action="store_true", help="three queues per job (status and progress)")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds a round may take (N/10, >= 300)")
    parser.add_argument(
        "--no-hold",
        action="store_true",
        help="let the worker run while a burst is submitted (a sync caller then has few jobs in flight)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--samples", action="store_true", help="with --json: every RSS sample too")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if (
        args.jobs < 1
        or args.rounds < 2
        or args.warmup < 1
        or not set(kinds) <= {"sync", "async"}
        or not kinds
    ):
        parser.error("--jobs and --warmup must be >= 1, --rounds >= 2, --kinds sync and/or async")
    timeout = args.timeout or max(300.0, args.jobs / 10)

    INTERRUPTS.install()
    base = Settings.from_env()
    measured_target = find_target(base)
    METER.groups = harness.meter_for(measured_target)
    say(f"measuring {measured_target.describe()}")
    run = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(base, task_queue=f"bench.burst.{run}")
    ledger = Ledger(run, 1 + len(kinds) * (args.warmup + args.rounds * args.jobs))
    logs = Path(tempfile.mkdtemp(prefix="ebb-burst-"))
    log = logs / "worker.log"
    rounds: list[Round] = []
    node = f"bench-burst-{run}@{socket.gethostname()}"
    options = Options(args.updates, timeout, Gate(settings, node, enabled=not args.no_hold))
    load_before = os.getloadavg()[0]
    try:
        env = {**os.environ, "EBB_TASK_QUEUE": settings.task_queue}
        with worker("tasks", node, env, log, say) as proc:
            wait_ready(settings, ledger, proc, log)
            for kind in kinds:
                if kind == "sync":
                    rounds += run_sync(settings, ledger, args.jobs, args.rounds, args.warmup, options)
                else:
                    rounds += asyncio.run(
                        run_async(settings, ledger, args.jobs, args.rounds, args.warmup, options)
                    )
    except KeyboardInterrupt:
        say(f"interrupted; deleting this run's queues (the worker is stopped); worker log kept in {logs}")
        cleanup(settings, ledger)
        return 130
    except BaseException:
        say(f"failed; worker log kept in {logs}")
        cleanup(settings, ledger)
        raise
    cleanup(settings, ledger)

    ours, others = harness.leftover_queues(
        settings, measured_target.management_url, worker_queues(settings), ledger.all_ids(), 30
    )
    meta: dict[str, Any] = {
        **harness.broker_meta(measured_target, load_before),
        "jobs": args.jobs,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "queues_per_job": "three queues" if args.updates else "the result queue only",
        "worker_held_while_submitting": not args.no_hold,
        "keep_results": settings.keep_results,
        "leftover_ours": ours,
        "leftover_others": others,
    }
    checks = targets(rounds, settings.keep_results)
    report = table(rounds, checks, meta)
    if args.json:
        print(report, file=sys.stderr)
        document = {
            "meta": meta,
            "rounds": [r.to_dict(args.samples) for r in rounds],
            "targets": checks,
        }
        print(json.dumps(document, indent=2))
    else:
        print(report)
    harness.remove_logs(logs)
    if not all(c["delivered_pass"] for c in checks.values()):
        return 1
    if not all(c["books_pass"] and c["growth_pass"] and c["in_flight_pass"] for c in checks.values()):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
