"""Can the orphaned-queue audit keep up with 30,000 idle job queues? Time and memory of one run.

The audit (``tasks.audit.Auditor.run``) lists every job queue through the management API and
classifies each one, so its cost grows with the number of queues the broker holds. This bench
fills a private vhost of the broker of EBB_BROKER_URL (EBB_MANAGEMENT_URL: the same node; the
registry in EBB_REDIS_URL's Redis) with idle job queues (10,000 jobs x 3 kinds by default, declared
exactly like the SDK does), registers the jobs in Redis, and measures three scenarios, each run
``--repeat`` times (3) in a fresh Python process so that its peak RSS is the audit's own:

  first        every queue is newly suspected, nothing confirmed yet
  confirm-all  ``confirm_after = 0``: every queue becomes an orphan at once (one log line each)
  steady       orphans already reported, nothing new

Targets for 30,000 queues: the median wall time of ``run()`` per scenario < 4 s, and the peak
RSS of every run < 100 MB. The median, because most of a run is RabbitMQ answering the listing,
and an idle RabbitMQ with 30,000 queues spends about half of two cores on its own statistics in
bursts every 5 s: a run that lands on one is slower; min and max are printed too. Each run is
split into its steps (management API, registry lookups, reconcile), with the CPU the broker's
beam.smp spent meanwhile (answering the listing, mostly). After the audits, the bench
times the raw management API listing (one request, a paginated walk, and a stats-free listing) and
checks that the audit touched no queue: the vhost refuses AMQP connections while the audits run
(a probe proves it), and the queue set, consumers, messages and message stats must be unchanged
afterwards. ``idle_since`` (a passive declare or ``basic.get`` resets it) is compared too, against
a few control queues outside the ``jobs.`` prefix: RabbitMQ sometimes re-dates every queue itself.

The first audit waits until 150 s after the last declare (``--settle``): right after 30,000
declares the broker answers the listing about 1.5x slower for two minutes, which no production
audit sees. A full run takes about ten minutes, mostly declaring and deleting 30,000 durable
queues and that wait. Do not run it alongside ``tests/test_restart.py``: a broker restart
recovers every one of them (slowing the restart to a minute) and voids the figures; the bench
notices and says so.

Run from anywhere::

    .venv/bin/python bench/bench_audit.py [--quick] [--queues N] [--registered F] [--repeat N]
                                          [--profile] [--json]
    EBB_BROKER_URL=amqp://guest:guest@127.0.0.1:5675// EBB_MANAGEMENT_URL=http://127.0.0.1:15675 \
        EBB_PROMETHEUS_URL=http://127.0.0.1:15695 .venv/bin/python bench/bench_audit.py   # another broker

The table goes to stdout; with ``--json`` one JSON document goes to stdout and the table to
stderr. Progress lines go to stderr. ``--profile`` adds diagnostic runs (cProfile, tracemalloc) of
the worst case, whose figures are not the measured ones. The vhost, and with it every queue, is
deleted at the end (Ctrl-C included), as are the Redis keys the run and its audits wrote. Exit
code 0 when every target and check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
import requests
from kombu.connection import Connection

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_audit.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cpu import Target, cpu_seconds, first_url, target
from ebb import contract
from ebb.config import Settings
from ebb.contract import QueueKind
from ebb.records import job_key
from tasks.audit import ORPHANS_KEY, SUSPECTS_KEY, UNEXPIRING_KEY
from tasks.broker_api import JOB_QUEUE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
KINDS = sorted(QueueKind)
#: ``x-expires`` of the bench's queues: long enough to stay idle for the whole run.
QUEUE_TTL = timedelta(hours=1)
#: Registry keys of the bench expire by themselves soon after, should cleanup never run.
REGISTRY_EXPIRE_S = int(QUEUE_TTL.total_seconds()) + 3600
#: Idle queues outside the audit's ``jobs.`` prefix, declared alike: the audit never looks at
#: them, so if ``idle_since`` moves on them too, the broker moved it, not the audit.
CONTROL_QUEUES = 30
CONTROL_PREFIX = "bench.control."
#: One synchronous declare after this many ``nowait`` ones, so the broker keeps up.
BARRIER_EVERY = 1000
#: What the audit asks the management API for.
COLUMNS = ",".join(JOB_QUEUE_COLUMNS)
PAGE_SIZE = 500
#: Management stats are emitted every 5 s; a queue touched during an audit shows it after that.
STATS_INTERVAL_S = 5.0
#: Seconds without a single queue gaining stats before the stragglers are nudged.
STATS_STALL_S = 20.0
#: Seconds between the last declare and the first audit: see main().
SETTLE_S = 150.0
TARGET_SECONDS = 4.0
TARGET_RSS_MB = 100.0
TARGET_QUEUES = 30_000
#: How long cleanup keeps retrying to delete the vhost while the management API is away.
CLEANUP_WAIT_S = 600.0

#: The audit process: a fresh interpreter, so its RSS is imports plus one audit and nothing else.
#: It reads a JSON config from stdin (it holds passwords: not in argv, which ``ps`` shows) and
#: prints one JSON document.
CHILD = r"""
import dataclasses, json, logging, resource, sys, time

cfg = json.loads(sys.stdin.read())


def proc_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


logging.basicConfig(
    filename=cfg["log"], level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
)
t0 = time.perf_counter()
from ebb.config import Settings
from tasks.audit import Auditor

import_s = time.perf_counter() - t0
# The environment's settings (EBB_*: management, Prometheus, Redis, TLS), on the bench's vhost.
settings = dataclasses.replace(Settings.from_env(), broker_url=cfg["broker_url"])
auditor = Auditor(settings)
if cfg["confirm_after"] is not None:
    auditor.confirm_after = cfg["confirm_after"]
out = {"import_s": import_s}
mode = cfg["profile"]
profiler = None
phases = []
if mode == "cprofile":
    import cProfile

    profiler = cProfile.Profile()
elif mode == "tracemalloc":
    import tracemalloc


def watch(obj, name):
    # Times one step of run() (three calls per run: no measurable cost); traces memory on demand.
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        phase = {"phase": name}
        if mode == "tracemalloc":
            phase["before_mb"] = tracemalloc.get_traced_memory()[0] / 1e6
            if name == "_reconcile":
                top = tracemalloc.take_snapshot().statistics("lineno")[:15]
                out["live_at_reconcile"] = [
                    {"where": str(s.traceback), "mb": s.size / 1e6, "blocks": s.count} for s in top
                ]
            tracemalloc.reset_peak()
        started = time.perf_counter()
        result = original(*args, **kwargs)
        phase["s"] = time.perf_counter() - started
        if mode == "tracemalloc":
            current, peak = tracemalloc.get_traced_memory()
            phase["peak_mb"], phase["after_mb"] = peak / 1e6, current / 1e6
        phases.append(phase)
        return result

    setattr(obj, name, wrapper)


watch(auditor.api, "job_queues")
watch(auditor.registry, "read_fields")
watch(auditor, "_reconcile")
if mode == "tracemalloc":
    tracemalloc.start()
out["rss_before_kb"] = proc_kb("VmRSS")
out["hwm_before_kb"] = proc_kb("VmHWM")
started = time.perf_counter()
if profiler is not None:
    profiler.enable()
report = auditor.run()
if profiler is not None:
    profiler.disable()
out["wall_s"] = time.perf_counter() - started
out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out["vmhwm_kb"] = proc_kb("VmHWM")
out["rss_after_kb"] = proc_kb("VmRSS")
out["duration_s"] = report.duration_s
out["registry_available"] = report.registry_available
out["counts"] = report.counts()
if mode == "cprofile":
    import io, pstats

    for key, sort, restrictions in (
        ("tottime", "tottime", (22,)),
        ("project", "cumulative", (r"/(tasks|ebb)/", 25)),
    ):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(*restrictions)
        out["profile_" + key] = text.getvalue()
elif mode == "tracemalloc":
    out["traced_peak_mb"] = max(p["peak_mb"] for p in phases) if phases else None
out["phases"] = phases
logging.shutdown()
print(json.dumps(out))
"""


def say(message: str) -> None:
    """Progress goes to stderr so that stdout stays the table (or the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def mb(kb: float) -> float:
    return kb / 1024


# --- the management API ------------------------------------------------------------------------


class Management:
    """The bench's own management API client, for setup, timing and checks (not the audit's)."""

    def __init__(self, settings: Settings) -> None:
        self.base = f"{first_url(settings.management_url).rstrip('/')}/api"
        self.session = requests.Session()
        self.session.auth = (settings.management_user, settings.management_password)
        self.user = settings.management_user

    def get(self, path: str, params: dict[str, str] | None = None, timeout: float = 120) -> Any:
        response = self.session.get(f"{self.base}/{path}", params=params, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def put(self, path: str, body: dict[str, Any]) -> None:
        response = self.session.put(f"{self.base}/{path}", json=body, timeout=60)
        response.raise_for_status()

    def delete(self, path: str, timeout: float = 60) -> int:
        return self.session.delete(f"{self.base}/{path}", timeout=timeout).status_code


def queue_list(api: Management, vhost: str, columns: str) -> list[dict[str, Any]]:
    data = api.get(f"queues/{quote(vhost, safe='')}", {"columns": columns})
    if not isinstance(data, list):
        raise RuntimeError(f"unexpected answer listing queues: {str(data)[:200]}")
    return [q for q in data if isinstance(q, dict)]


# --- setup -------------------------------------------------------------------------------------


def create_vhost(api: Management, vhost: str, users: set[str]) -> None:
    """A vhost of its own: tests on ``/`` never see the bench's queues, and one DELETE drops them."""
    api.put(f"vhosts/{quote(vhost, safe='')}", {"description": "ebb bench_audit.py, deleted at exit"})
    for user in sorted(users):  # the AMQP user of EBB_BROKER_URL and the management user
        api.put(
            f"permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )


def in_vhost(base: Settings, vhost: str) -> Settings:
    """``base`` with the first broker URL of its list, on ``vhost``: the bench's private one."""
    parts = urlsplit(first_url(base.broker_url))
    return dataclasses.replace(base, broker_url=urlunsplit(parts._replace(path="/" + quote(vhost, safe=""))))


def queue_specs(n: int) -> list[tuple[uuid.UUID, QueueKind]]:
    """``n`` queues, three per job (the last job may have fewer)."""
    jobs = [uuid.uuid4() for _ in range(math.ceil(n / len(KINDS)))]
    return [(job, kind) for job in jobs for kind in KINDS][:n]


def declare_queues(settings: Settings, specs: list[tuple[uuid.UUID, QueueKind]]) -> float:
    """Declare as the SDK does (``nowait`` on one channel); a synchronous declare is the barrier."""
    started = time.perf_counter()
    with Connection(settings.broker_url, connect_timeout=10) as connection:
        channel = connection.channel()
        for i, (job_id, kind) in enumerate(specs, 1):
            barrier = i % BARRIER_EVERY == 0 or i == len(specs)
            contract.job_queue(job_id, kind, QUEUE_TTL).queue_declare(nowait=not barrier, channel=channel)
            if barrier and i % (BARRIER_EVERY * 5) == 0:
                say(f"  {i} queues declared")
        for i in range(CONTROL_QUEUES):
            control = contract.job_queue(uuid.UUID(int=i), QueueKind.RESULT, QUEUE_TTL)
            control.name = f"{CONTROL_PREFIX}{i:03d}"
            control.queue_declare(nowait=i < CONTROL_QUEUES - 1, channel=channel)
    return time.perf_counter() - started


def register_jobs(client: redis.Redis, job_ids: list[uuid.UUID]) -> float:
    """Registry records as a finished job whose result was never fetched leaves them."""
    started = time.perf_counter()
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for i, job_id in enumerate(job_ids, 1):
        record: dict[Any, Any] = {  # redis-py's hset mapping type is invariant in its keys
            "workflow": "bench.audit",
            "status": "SUCCEEDED",
            "submitted_at": now - 60,
            "started_at": now - 59,
            "finished_at": now - 58,
            "result_delivered": "0",
            "queues_last_in_use": now - 60,
            "ttl": QUEUE_TTL.total_seconds(),
        }
        pipe.hset(job_key(job_id), mapping=record)
        pipe.expire(job_key(job_id), REGISTRY_EXPIRE_S)
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - started


def nudge(settings: Settings, names: list[str]) -> int:
    """Passive-declare queues whose stats never came: the call wakes the queue, which then reports.

    Only during setup, before anything is measured; returns how many answered.
    """
    answered = 0
    with Connection(settings.broker_url, connect_timeout=10) as connection:
        channel = connection.channel()
        for name in names:
            try:
                channel.queue_declare(queue=name, passive=True)
                answered += 1
            except Exception as exc:  # a queue whose process is gone: the channel closes with it
                say(f"  passive declare of {name} failed: {exc}")
                channel = connection.channel()
    return answered


def wait_for_stats(api: Management, settings: Settings, n: int) -> dict[str, Any]:
    """Wait until all ``n`` queues have stats, and their ``idle_since`` has settled.

    The audit calls a queue without stats "new". A few queues of a large batch may stay without
    stats for minutes; after ``STATS_STALL_S`` without progress they are nudged (see ``nudge``).
    A new queue reports ``idle_since`` once more when it first hibernates; only after that is the
    value a fixed point to compare against.
    """
    started = time.monotonic()
    deadline = started + max(180.0, n / 100)
    previous: dict[str, Any] | None = None
    out: dict[str, Any] = {"nudged": 0, "nudged_answered": 0, "lacking_example": None}
    best, progress_at = -1, started
    while True:
        queues = queue_list(api, settings.vhost, "name,consumers,idle_since")
        current = {str(q["name"]): q.get("idle_since") for q in queues if "consumers" in q}
        complete = len(queues) == n and len(current) == n and all(current.values())
        if complete and current == previous:
            out["wait_s"] = time.monotonic() - started
            return out
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"after {time.monotonic() - started:.0f} s: {len(queues)} queues, {len(current)} with "
                "stats, or idle_since still moving"
            )
        if len(current) > best:
            best, progress_at = len(current), time.monotonic()
        lacking = [str(q["name"]) for q in queues if "consumers" not in q]
        if complete and previous is None:
            say(f"  all {n} queues have stats; checking that idle_since has settled")
        elif complete:
            moved = sum(1 for k, v in current.items() if previous is not None and previous.get(k) != v)
            say(f"  idle_since moved on {moved} queues since the last look; waiting for it to settle")
        elif len(queues) == n and lacking and time.monotonic() - progress_at > STATS_STALL_S:
            detail = api.get(f"queues/{quote(settings.vhost, safe='')}/{quote(lacking[0], safe='')}")
            out["lacking_example"] = {k: v for k, v in detail.items() if not k.endswith("_details")}
            say(f"  {len(lacking)} queues still without stats, e.g. {out['lacking_example']}; nudging them")
            out["nudged"] += len(lacking)
            out["nudged_answered"] += nudge(settings, lacking)
            progress_at = time.monotonic()
        else:
            say(f"  {len(queues)}/{n} queues listed, {len(current)} with stats; waiting")
        previous = current if complete else None
        time.sleep(STATS_INTERVAL_S + 1 if complete else 2)


# --- the management API, timed -----------------------------------------------------------------


@dataclass(frozen=True)
class ApiTiming:
    single_s: float  # median of the runs: request and download
    single_runs: list[float]
    parse_s: float
    body_mb: float
    listed: int
    paginated_s: float
    pages: int
    paginated_listed: int
    #: A possible cheaper source: the queue list without per-queue stats, plus the vhost's consumers.
    no_stats_s: float
    no_stats_listed: int
    no_stats_sample: dict[str, Any]
    consumers_s: float


def time_api(api: Management, vhost: str, repeats: int = 3) -> ApiTiming:
    """What the audit's one request costs, and what walking the same list page by page would."""
    url = f"{api.base}/queues/{quote(vhost, safe='')}"
    runs: list[float] = []
    body = b""
    for _ in range(repeats):
        started = time.perf_counter()
        response = api.session.get(url, params={"columns": COLUMNS}, timeout=120)
        response.raise_for_status()
        body = response.content
        runs.append(time.perf_counter() - started)
    started = time.perf_counter()
    listed = len(json.loads(body))
    parse_s = time.perf_counter() - started

    page, pages, walked = 1, 1, 0
    started = time.perf_counter()
    while page <= pages:
        params = {
            "columns": COLUMNS,
            "page": str(page),
            "page_size": str(PAGE_SIZE),
            "name": contract.QUEUE_NAME_REGEX,
            "use_regex": "true",
        }
        data = api.get(f"queues/{quote(vhost, safe='')}", params)
        pages = int(data["page_count"])
        walked += len(data["items"])
        page += 1
    paginated_s = time.perf_counter() - started

    no_stats: list[float] = []
    items: list[dict[str, Any]] = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = api.session.get(
            url,
            params={"disable_stats": "true", "enable_queue_totals": "true", "columns": COLUMNS},
            timeout=120,
        )
        response.raise_for_status()
        items = response.json()
        no_stats.append(time.perf_counter() - started)
    started = time.perf_counter()
    api.get(f"consumers/{quote(vhost, safe='')}")
    consumers_s = time.perf_counter() - started
    return ApiTiming(
        single_s=statistics.median(runs),
        single_runs=runs,
        parse_s=parse_s,
        body_mb=len(body) / 1e6,
        listed=listed,
        paginated_s=paginated_s,
        pages=pages,
        paginated_listed=walked,
        no_stats_s=statistics.median(no_stats),
        no_stats_listed=len(items),
        no_stats_sample=items[0] if items else {},
        consumers_s=consumers_s,
    )


# --- "no queue touched" --------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What an AMQP touch would change: consumers, messages, and ``idle_since`` of each queue."""

    queues: dict[str, tuple[Any, Any, Any]]
    vhost_messages: Any
    message_stats: dict[str, Any]
    consumers: int
    connections: int


def snapshot(api: Management, vhost: str) -> Snapshot:
    q_vhost = quote(vhost, safe="")
    queues = queue_list(api, vhost, "name,consumers,messages,idle_since")
    info = api.get(f"vhosts/{q_vhost}")
    stats = info.get("message_stats") or {}
    return Snapshot(
        queues={str(q["name"]): (q.get("consumers"), q.get("messages"), q.get("idle_since")) for q in queues},
        vhost_messages=info.get("messages"),
        message_stats={k: v for k, v in stats.items() if not k.endswith("_details")},
        consumers=len(api.get(f"consumers/{q_vhost}")),
        connections=len(api.get(f"vhosts/{q_vhost}/connections")),
    )


def compare(before: Snapshot, after: Snapshot, n: int) -> tuple[list[str], dict[str, int]]:
    """Every difference an audit that consumed, declared or got from a queue would leave.

    ``idle_since`` also moves when RabbitMQ wakes every queue for its own reasons (after a memory
    monitor update, say): only job queues moving while the control queues stay put is a touch.
    """
    problems: list[str] = []
    if len(before.queues) != n or set(before.queues) != set(after.queues):
        problems.append(
            f"queue set changed: {len(before.queues)} before, {len(after.queues)} after (expected {n})"
        )
    with_consumer = [name for name, (consumers, _, _) in after.queues.items() if consumers != 0]
    if with_consumer:
        problems.append(f"{len(with_consumer)} queues have consumers (or no stats), e.g. {with_consumer[0]}")
    messages = sum(m for _, m, _ in after.queues.values() if isinstance(m, int))
    if messages or before.vhost_messages != after.vhost_messages:
        problems.append(f"messages: {before.vhost_messages} before, {after.vhost_messages} after")
    reset = [name for name, v in before.queues.items() if after.queues.get(name, v)[2] != v[2]]
    moved = {
        "jobs": sum(1 for name in reset if name.startswith(contract.QUEUE_PREFIX)),
        "control": sum(1 for name in reset if name.startswith(CONTROL_PREFIX)),
    }
    if moved["jobs"] and not moved["control"]:
        problems.append(f"idle_since moved on {moved['jobs']} job queues and no control queue: touched")
    if before.message_stats != after.message_stats:
        problems.append(f"vhost message stats changed: {before.message_stats} -> {after.message_stats}")
    if after.consumers or after.connections:
        problems.append(f"{after.consumers} consumers, {after.connections} connections on the vhost")
    return problems, moved


@contextlib.contextmanager
def amqp_refused(api: Management, settings: Settings) -> Iterator[bool]:
    """While the audits run, the vhost refuses AMQP connections: any AMQP use would fail loudly.

    Yields whether a probe connection was indeed refused (the guard works).
    """
    path = f"vhost-limits/{quote(settings.vhost, safe='')}/max-connections"
    api.put(path, {"value": 0})
    try:
        refused = False
        try:
            with Connection(settings.broker_url, connect_timeout=10) as connection:
                connection.connect()
        except Exception as exc:  # amqp.exceptions.NotAllowed: connection limit (0) is reached
            refused = "limit" in str(exc) or type(exc).__name__ == "NotAllowed"
        yield refused
    finally:
        with contextlib.suppress(requests.RequestException):  # deleting the vhost drops it anyway
            api.delete(path)


def sensor_check(api: Management, settings: Settings, queue: str) -> float | None:
    """Positive control: a passive declare must move ``idle_since``; seconds until it showed."""
    q_path = f"queues/{quote(settings.vhost, safe='')}/{quote(queue, safe='')}"
    before = api.get(q_path).get("idle_since")
    time.sleep(1.1)  # idle_since has a resolution of a millisecond, but let it differ visibly
    with Connection(settings.broker_url, connect_timeout=10) as connection:
        connection.default_channel.queue_declare(queue=queue, passive=True)
    started = time.monotonic()
    while time.monotonic() - started < 3 * STATS_INTERVAL_S:
        if api.get(q_path).get("idle_since") != before:
            return time.monotonic() - started
        time.sleep(0.5)
    return None


# --- the audit, in a fresh process ----------------------------------------------------------------


@dataclass
class AuditRun:
    label: str
    result: dict[str, Any]
    orphan_lines: int
    expected: dict[str, int]
    scenario: str
    mismatches: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return float(self.result["wall_s"])

    @property
    def peak_mb(self) -> float:
        """VmHWM: the peak of this process image only.

        ``ru_maxrss`` is reported too but not used: Linux carries the peak of the image an
        ``execve`` replaced into it, and the child starts as a (v)fork of this bench, which holds
        tens of MB of queue listings; so for a small audit it shows the bench, not the audit.
        """
        return mb(self.result["vmhwm_kb"])

    @property
    def maxrss_mb(self) -> float:
        return mb(self.result["maxrss_kb"])

    @property
    def baseline_mb(self) -> float:
        return mb(self.result["rss_before_kb"])

    @property
    def broker_cpu_s(self) -> float | None:
        value = self.result.get("broker_cpu_s")
        return None if value is None else float(value)

    def phase_s(self, name: str) -> float:
        """Seconds ``run()`` spent in one step: the management API, the registry, the reconcile."""
        return sum(float(p["s"]) for p in self.result.get("phases", []) if p["phase"] == name)

    @property
    def time_ok(self) -> bool:
        return self.wall_s < TARGET_SECONDS

    @property
    def rss_ok(self) -> bool:
        return self.peak_mb < TARGET_RSS_MB

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": round(self.peak_mb, 1),
            "ru_maxrss_mb": round(self.maxrss_mb, 1),
            "rss_before_mb": round(self.baseline_mb, 1),
            "rss_increase_mb": round(self.peak_mb - self.baseline_mb, 1),
            "time_pass": self.time_ok,
            "rss_pass": self.rss_ok,
            "api_s": round(self.phase_s("job_queues"), 3),
            "registry_s": round(self.phase_s("read_fields"), 3),
            "reconcile_s": round(self.phase_s("_reconcile"), 3),
            "broker_cpu_s": None if self.broker_cpu_s is None else round(self.broker_cpu_s, 3),
            "orphan_found_lines": self.orphan_lines,
            "expected": self.expected,
            "mismatches": self.mismatches,
            "child": self.result,
        }


def scenario_verdicts(runs: list[AuditRun]) -> dict[str, dict[str, Any]]:
    """Per scenario: the median run() time against the target, and the worst peak RSS."""
    verdicts: dict[str, dict[str, Any]] = {}
    for scenario in dict.fromkeys(run.scenario for run in runs):
        walls = [run.wall_s for run in runs if run.scenario == scenario]
        peak = max(run.peak_mb for run in runs if run.scenario == scenario)
        median = statistics.median(walls)
        verdicts[scenario] = {
            "runs": len(walls),
            "median_s": round(median, 3),
            "min_s": round(min(walls), 3),
            "max_s": round(max(walls), 3),
            "peak_rss_mb": round(peak, 1),
            "time_ok": median < TARGET_SECONDS,
            "rss_ok": peak < TARGET_RSS_MB,
        }
    return verdicts


def run_child(
    settings: Settings, log: Path, confirm_after: float | None, profile: str | None
) -> dict[str, Any]:
    """One ``Auditor(settings).run()`` in a new interpreter; its JSON report."""
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    cfg = {
        "broker_url": settings.broker_url,
        "log": str(log),
        "confirm_after": confirm_after,
        "profile": profile,
    }
    proc = subprocess.run(
        [python, "-c", CHILD], input=json.dumps(cfg), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise RuntimeError(f"audit process exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def audit_keys(settings: Settings) -> tuple[str, str, str]:
    """The audit's memory in Redis: suspects, orphans, queues without expiry."""
    suspects, orphans, unexpiring = (
        key.format(vhost=settings.vhost) for key in (SUSPECTS_KEY, ORPHANS_KEY, UNEXPIRING_KEY)
    )
    return suspects, orphans, unexpiring


def audit(
    settings: Settings,
    measured: Target,
    logs: Path,
    label: str,
    confirm_after: float | None,
    expected: dict[str, int],
    scenario: str,
) -> AuditRun:
    log = logs / f"audit-{label}.log"
    say(f"audit run '{label}' (confirm_after={confirm_after if confirm_after is not None else 'default'})")
    beam = measured.rabbitmq()
    cpu_before = cpu_seconds(beam)
    result = run_child(settings, log, confirm_after, None)
    # What the broker spent while the audit process lived: answering the listing, mostly.
    result["broker_cpu_s"] = cpu_seconds(beam) - cpu_before if beam else None
    lines = sum(1 for line in log.read_text().splitlines() if "event=orphan_found" in line)
    run = AuditRun(label, result, lines, expected, scenario)
    counts = dict(result["counts"], orphan_found_lines=lines)
    run.mismatches = [
        f"{k}={counts.get(k)} (expected {v})" for k, v in expected.items() if counts.get(k) != v
    ]
    say(
        f"  {run.wall_s:.2f} s, peak RSS {run.peak_mb:.1f} MB (before run {run.baseline_mb:.1f} MB), "
        f"counts {result['counts']}"
    )
    return run


def diagnose(settings: Settings, client: redis.Redis, logs: Path) -> dict[str, Any]:
    """Profile the worst case (confirm-all) again: cProfile for time, tracemalloc for memory."""
    orphans_key = audit_keys(settings)[1]
    out: dict[str, Any] = {}
    for mode in ("cprofile", "tracemalloc"):
        client.delete(orphans_key)  # suspects stay: with confirm_after 0 all are confirmed again
        say(f"diagnostic run: {mode} (worst case again; figures are not the measured ones)")
        try:
            out[mode] = run_child(settings, logs / f"diag-{mode}.log", 0.0, mode)
        except Exception as exc:
            out[mode] = {"error": repr(exc)[:2000]}
    return out


# --- cleanup -----------------------------------------------------------------------------------


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C would leave 30,000 queues behind."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def delete_vhost(api: Management, vhost: str) -> dict[str, Any]:
    """DELETE the vhost, retrying while the management API is away (a test may restart the broker)."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            status: int | str = api.delete(f"vhosts/{quote(vhost, safe='')}", timeout=900)
        except requests.RequestException as exc:
            status = repr(exc)
        if status in (204, 404) or time.monotonic() - started > CLEANUP_WAIT_S:
            break
        say(f"  deleting vhost {vhost}: {str(status)[:90]}; retrying (up to {CLEANUP_WAIT_S:.0f} s in all)")
        time.sleep(5)
    gone: bool | str = "unknown"
    while time.monotonic() - started < CLEANUP_WAIT_S + 60:
        try:
            gone = vhost not in {v["name"] for v in api.get("vhosts")}
            break
        except requests.RequestException as exc:
            gone = f"unknown: {exc!r}"
            time.sleep(5)
    if gone is not True:
        say(
            f"VHOST {vhost} MAY BE LEFT OVER; delete it with: curl -u {api.user} -X DELETE "
            f"{api.base}/vhosts/{quote(vhost, safe='')}"
        )
    return {
        "vhost_delete_status": status,
        "vhost_delete_attempts": attempts,
        "vhost_delete_s": round(time.monotonic() - started, 2),
        "vhost_gone": gone,
    }


def cleanup(api: Management, client: redis.Redis, vhost: str, job_ids: list[uuid.UUID]) -> dict[str, Any]:
    """Drop every Redis key of this run and the vhost (all its queues at once); then check both."""
    out: dict[str, Any] = {}
    with uninterruptible():
        say(f"deleting this run's Redis keys and vhost {vhost}")
        pattern = f"ebb:audit:{vhost}:*"
        batches = [[job_key(j) for j in job_ids[i : i + 1000]] for i in range(0, len(job_ids), 1000)]
        try:
            removed = 0
            audit_keys = list(client.scan_iter(match=pattern, count=1000))
            for keys in [audit_keys, *batches]:
                if keys:
                    removed += int(client.delete(*keys))
            left = len(list(client.scan_iter(match=pattern, count=1000)))
            left += sum(int(client.exists(*keys)) for keys in batches)
            out["redis_keys_removed"] = removed
            out["redis_keys_left"] = left
        except redis.RedisError as exc:
            out["redis_keys_left"] = f"unknown: {exc!r}"
        out.update(delete_vhost(api, vhost))
    say(f"cleanup: {out}")
    return out


# --- report ------------------------------------------------------------------------------------


def beam(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def table(meta: dict[str, Any], api_t: ApiTiming | None, runs: list[AuditRun], checks: dict[str, Any]) -> str:
    n = meta["queues"]
    lines = [
        f"Ebb audit benchmark: RabbitMQ {meta['rabbitmq']}, {meta['cores']} cores, vhost {meta['vhost']}, "
        f"load {meta['load_avg_1min']['before']:.2f} -> {meta['load_avg_1min']['after']:.2f}",
        f"measured: {meta['broker_described']}",
        "",
        f"{'queues':<34}{n} ({meta['jobs']} jobs x up to 3 kinds, idle, x-expires "
        f"{QUEUE_TTL.total_seconds():.0f} s) + {CONTROL_QUEUES} control queues; "
        f"{meta['registered']} jobs in the registry",
        f"{'create queues (nowait declares)':<34}{meta['create_s']:.2f} s "
        f"({n / meta['create_s']:.0f} queues/s)"
        f"; registry {meta['register_s']:.2f} s; all stats in after {meta['stats_wait_s']:.1f} s; "
        f"first audit {meta.get('settle_s', 0):.0f} s after the last declare",
    ]
    if meta.get("stats", {}).get("nudged"):
        lines.append(
            f"{'':<34}({meta['stats']['nudged']} queues got no stats for {STATS_STALL_S:.0f} s and were "
            f"nudged with a passive declare before any measurement; "
            f"{meta['stats']['nudged_answered']} answered)"
        )
    if api_t is not None:
        lines += [
            f"{'API: one request (audit columns)':<34}{api_t.single_s:.2f} s median of "
            f"{len(api_t.single_runs)} ({', '.join(f'{s:.2f}' for s in api_t.single_runs)}), "
            f"{api_t.body_mb:.1f} MB, {api_t.listed} queues; json.loads {api_t.parse_s:.2f} s",
            f"{'API: paginated walk':<34}{api_t.paginated_s:.2f} s ({api_t.pages} pages of {PAGE_SIZE}, "
            f"name=^jobs\\. regex, {api_t.paginated_listed} queues)",
            f"{'API: no stats, queue totals':<34}{api_t.no_stats_s:.2f} s median (disable_stats=true&"
            f"enable_queue_totals=true, {api_t.no_stats_listed} queues, fields "
            f"{','.join(sorted(api_t.no_stats_sample))}); "
            f"GET /api/consumers/<vhost> {api_t.consumers_s:.2f} s",
        ]
    lines += [
        "",
        f"{'audit run':<13}{'run() s':>8}{'api':>7}{'redis':>7}{'recon':>7}{'beam':>7}{'rss before':>12}"
        f"{'peak rss':>10}"
        f"{'increase':>10}{'< 4 s':>7}{'< 100 MB':>10}  counts",
    ]
    for run in runs:
        c = run.result["counts"]
        counts = ", ".join(f"{k}={v}" for k, v in c.items() if v) + f", orphan_found lines={run.orphan_lines}"
        lines.append(
            f"{run.label:<13}{run.wall_s:>8.2f}{run.phase_s('job_queues'):>7.2f}{run.phase_s('read_fields'):>7.2f}"
            f"{run.phase_s('_reconcile'):>7.2f}{beam(run.broker_cpu_s):>7}"
            f"{run.baseline_mb:>9.1f} MB{run.peak_mb:>7.1f} MB"
            f"{run.peak_mb - run.baseline_mb:>7.1f} MB{'PASS' if run.time_ok else 'FAIL':>7}"
            f"{'PASS' if run.rss_ok else 'FAIL':>10}  {counts}"
        )
        if run.mismatches:
            lines.append(f"{'':<13}not the intended scenario: {'; '.join(run.mismatches)}")
    for scenario, v in scenario_verdicts(runs).items():
        lines.append(
            f"{scenario:<13}median {v['median_s']:.2f} s of {v['runs']} (min {v['min_s']:.2f}, max "
            f"{v['max_s']:.2f}): {'PASS' if v['time_ok'] else 'FAIL'} < {TARGET_SECONDS:.0f} s; "
            f"worst peak RSS {v['peak_rss_mb']:.1f} MB: {'PASS' if v['rss_ok'] else 'FAIL'} "
            f"< {TARGET_RSS_MB:.0f} MB"
        )
    if runs:
        lines.append(
            f"(api = BrokerAPI.job_queues (request + JSON, in a thread), redis = Registry.read_fields "
            f"(mostly while the request runs), recon = "
            f"_reconcile (Redis memory, orphan log lines); beam = CPU s of the broker's beam.smp while "
            f"the audit process ran; peak rss = VmHWM of the audit process; rss "
            f"before = VmRSS just before run(), i.e. the imports ({runs[0].result['import_s']:.2f} s))"
        )
        lines.append(
            "(ru_maxrss, MB: "
            + ", ".join(f"{run.label} {run.maxrss_mb:.1f}" for run in runs)
            + "; it also holds the bench's own pre-exec peak, hence VmHWM above)"
        )
    if n != TARGET_QUEUES:
        lines.append(f"(targets are set for {TARGET_QUEUES} queues; this run had {n})")
    untouched = checks.get("untouched")
    if untouched is not None:
        verdict = "PASS" if untouched["ok"] else "FAIL"
        moved = untouched["idle_since_moved"]
        lines += [
            "",
            f"no queue touched: {verdict}: AMQP to the vhost refused during the audits "
            f"(guard probe refused: {untouched['guard_effective']}); "
            f"{untouched['queues_before']} queues before, {untouched['queues_after']} after "
            f"(incl. {CONTROL_QUEUES} control queues); no consumer, no message, vhost message stats unchanged"
            + ("" if untouched["ok"] else f"; problems: {untouched['problems']}"),
            f"  idle_since moved on {moved['jobs']} job queues and {moved['control']}/{CONTROL_QUEUES} "
            "control queues"
            + (
                " (the broker woke them all: inconclusive, the guard decides)"
                if moved["control"]
                else ("" if moved["jobs"] else " (none touched)")
            )
            + "; sensor check: a passive declare moved a queue's idle_since after "
            + (f"{untouched['sensor_s']:.1f} s" if untouched["sensor_s"] is not None else "NEVER (blind)"),
        ]
    broker = checks.get("broker")
    if broker is not None and broker["restarted"]:
        lines.append(
            f"BROKER RESTARTED during the run (churn counters {broker['churn_start']} -> "
            f"{broker['churn_end']}; another test?): the figures above are not valid"
        )
    cleaned = checks.get("cleanup")
    if cleaned is not None:
        lines.append(
            f"cleanup: vhost deleted in {cleaned.get('vhost_delete_s')} s, "
            f"gone: {cleaned.get('vhost_gone')}; "
            f"Redis keys left: {cleaned.get('redis_keys_left')}"
        )
    diag = checks.get("diagnostics")
    if diag:
        lines += ["", "diagnostics (worst case re-run; profiler overhead included):"]
        prof = diag["cprofile"]
        if "error" in prof:
            lines.append(f"cProfile run failed: {prof['error']}")
        else:
            lines += [
                f"cProfile: run() {prof['wall_s']:.2f} s; by own time, then project code by cumulative time",
                prof["profile_tottime"],
                prof["profile_project"],
            ]
        mem = diag["tracemalloc"]
        if "error" in mem:
            lines.append(f"tracemalloc run failed: {mem['error']}")
        else:
            lines.append(
                f"tracemalloc: run() {mem['wall_s']:.2f} s, "
                f"traced peak {mem.get('traced_peak_mb') or 0:.1f} MB; per phase (MB traced):"
            )
            for p in mem.get("phases", []):
                lines.append(
                    f"  {p['phase']:<12} {p['s']:5.2f} s  before {p['before_mb']:6.1f}  "
                    f"peak {p['peak_mb']:6.1f}  after {p['after_mb']:6.1f}"
                )
            lines.append("  live at _reconcile entry, top allocation sites:")
            for s in mem.get("live_at_reconcile", []):
                lines.append(f"    {s['mb']:7.1f} MB {s['blocks']:>8} blocks  {s['where']}")
    if "error" in checks:
        lines += ["", f"RUN FAILED: {checks['error']}"]
    return "\n".join(lines)


def broker_churn(api: Management) -> int | None:
    """Connections and queue declares since the RabbitMQ app started (all vhosts).

    A test that restarts the broker (``rabbitmqctl stop_app``/``start_app``) resets these
    counters, while the Erlang VM's uptime goes on: if the sum went down, the broker restarted
    under the run.
    """
    with contextlib.suppress(requests.RequestException, KeyError, ValueError, TypeError):
        churn = api.get("overview")["churn_rates"]
        return int(churn["connection_created"]) + int(churn["queue_declared"])
    return None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Set up, measure, check, and always clean up, in that order."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queues", type=int, default=TARGET_QUEUES, help=f"job queues ({TARGET_QUEUES})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3000 queues")
    parser.add_argument(
        "--registered", type=float, default=1.0, help="fraction of the jobs in the Redis registry (1.0)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help=f"seconds after the last declare before the first audit ({SETTLE_S:.0f}; 10 with --quick)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="audit runs per scenario, judged by their median (3)"
    )
    parser.add_argument("--profile", action="store_true", help="add cProfile/tracemalloc diagnostic runs")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = parser.parse_args(argv)
    n = 3000 if args.quick else args.queues
    if args.settle is None:
        args.settle = 10.0 if args.quick else SETTLE_S
    if n < 1 or not 0.0 <= args.registered <= 1.0:
        parser.error("--queues must be at least 1 and --registered within 0..1")
    signal.signal(signal.SIGTERM, _interrupt)

    vhost = f"ebb-bench-audit-{uuid.uuid4().hex[:8]}"
    base = Settings.from_env()
    measured = target(base)
    say(f"measuring {measured.describe()}")
    settings = in_vhost(base, vhost)
    api = Management(settings)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=30)
    specs = queue_specs(n)
    job_ids = list(dict.fromkeys(job for job, _ in specs))
    registered = job_ids[: round(len(job_ids) * args.registered)]
    logs = Path(tempfile.mkdtemp(prefix="ebb-bench-audit-"))
    meta: dict[str, Any] = {
        "rabbitmq": measured.version,
        "broker": measured.to_dict(),
        "broker_described": measured.describe(),
        "cores": os.cpu_count(),
        "vhost": vhost,
        "queues": n,
        "jobs": len(job_ids),
        "registered": len(registered),
        "load_avg_1min": {"before": os.getloadavg()[0]},
    }
    runs: list[AuditRun] = []
    checks: dict[str, Any] = {}
    api_t: ApiTiming | None = None
    try:
        say(f"creating vhost {vhost}")
        amqp_user = unquote(urlsplit(settings.broker_url).username or "guest")
        create_vhost(api, vhost, {amqp_user, settings.management_user})
        say(f"declaring {n} job queues")
        meta["create_s"] = declare_queues(settings, specs)
        declared_at = time.monotonic()
        churn_start = broker_churn(api)
        say(f"  {n} queues in {meta['create_s']:.2f} s; registering {len(registered)} jobs in Redis")
        meta["register_s"] = register_jobs(client, registered)
        say("waiting for the management stats of every queue")
        stats = wait_for_stats(api, settings, n + CONTROL_QUEUES)
        meta["stats_wait_s"] = stats.pop("wait_s")
        meta["stats"] = stats
        before = snapshot(api, vhost)
        # A broker that has just taken 30,000 declares in a minute and a half answers the listing
        # ~1.5x slower for about two minutes (3.4-4.0 s here, then 2.0-2.5 s); production audits
        # meet queues declared over hours. Wait that out, and the snapshot's own load.
        settle = max(STATS_INTERVAL_S, args.settle - (time.monotonic() - declared_at))
        say(f"letting the broker settle for {settle:.0f} s ({args.settle:.0f} s after the last declare)")
        time.sleep(settle)
        meta["settle_s"] = round(time.monotonic() - declared_at, 1)
        known = set(registered)
        unreg = sum(1 for job, _ in specs if job not in known)
        scenarios = (
            ("first", None, {"suspect": n, "new": 0, "new_orphans": 0, "unknown_to_registry": unreg}),
            (
                "confirm-all",
                0.0,
                {"orphaned": n, "new_orphans": n, "orphan_found_lines": n, "unknown_to_registry": unreg},
            ),
            ("steady", None, {"orphaned": n, "new_orphans": 0, "orphan_found_lines": 0}),
        )
        with amqp_refused(api, settings) as guard:
            for label, confirm_after, expected in scenarios:
                for i in range(args.repeat):
                    if label == "first":  # a first audit each time: the audit forgets all
                        client.delete(*audit_keys(settings))
                    elif label == "confirm-all":  # suspects stay; orphans are confirmed again
                        client.delete(audit_keys(settings)[1])
                    name = label if i == 0 else f"{label}#{i + 1}"
                    runs.append(audit(settings, measured, logs, name, confirm_after, expected, label))
            time.sleep(2 * STATS_INTERVAL_S + 1)  # a touch during the last run shows in the stats by then
            after = snapshot(api, vhost)
            problems, moved = compare(before, after, n + CONTROL_QUEUES)
            if not guard:
                problems.append("the guard did not refuse an AMQP connection")
        say("timing the management API listing (after the audits: its paginated walk loads the broker)")
        api_t = time_api(api, vhost)
        churn_end = broker_churn(api)
        checks["broker"] = {
            "churn_start": churn_start,
            "churn_end": churn_end,
            "restarted": churn_start is None or churn_end is None or churn_end < churn_start,
        }
        say("sensor check: passive-declaring one queue must move its idle_since")
        sensor_s = sensor_check(api, settings, contract.queue_name(*specs[0]))
        checks["untouched"] = {
            "ok": not problems,
            "problems": problems,
            "guard_effective": guard,
            "queues_before": len(before.queues),
            "queues_after": len(after.queues),
            "sensor_s": sensor_s,
            "idle_since_moved": moved,
        }
        if args.profile:
            checks["diagnostics"] = diagnose(settings, client, logs)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    except Exception as exc:  # report what was measured before it; cleanup runs regardless
        traceback.print_exc()
        say(f"failed: {exc!r}")
        checks["error"] = repr(exc)[:1000]
    finally:
        checks["cleanup"] = cleanup(api, client, vhost, job_ids)
        for path in logs.iterdir():
            path.unlink()
        logs.rmdir()

    meta["load_avg_1min"]["after"] = os.getloadavg()[0]
    report = table(meta, api_t, runs, checks)
    cleaned = checks["cleanup"]
    ok = (
        "error" not in checks
        and len(runs) == 3 * args.repeat
        and all(verdict["time_ok"] for verdict in scenario_verdicts(runs).values())
        and all(run.rss_ok and not run.mismatches for run in runs)
        and checks.get("untouched", {}).get("ok") is True
        and checks.get("broker", {}).get("restarted") is False
        and cleaned.get("vhost_gone") is True
        and cleaned.get("redis_keys_left") == 0
    )
    if args.json:
        print(report, file=sys.stderr)
        document = {
            "meta": meta,
            "api": asdict(api_t) if api_t else None,
            "runs": [run.to_dict() for run in runs],
            "scenarios": scenario_verdicts(runs),
            "targets": {"seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB, "queues": TARGET_QUEUES},
            "checks": checks,
            "pass": ok,
        }
        print(json.dumps(document, indent=2))
    else:
        print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
