"""Ebb's Prometheus metrics: the catalogue, and the one-line recorders jobs, the audit and beat call.

Nothing is recorded until :func:`enable` ran in this process or in the process that forked it
(``tasks/metrics_server.py`` calls it from a worker's or beat's main process, once the
multiprocess directory is set up and the port is bound): callers, ``ebb audit`` and processes
without ``EBB_METRICS_PORT`` record nothing and pay nothing. Every recorder swallows its own
errors (logged at DEBUG): metrics never break a job or an audit. Labels never carry a job id.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec

from prometheus_client import Counter, Gauge, Histogram

from ebb.contract import JobStatus, QueueKind
from ebb.logfmt import log_event
from tasks import workflows

logger = logging.getLogger("ebb.metrics")
P = ParamSpec("P")

#: Job run times, from a second to a day: Ebb's jobs are long.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
#: Why a finished job's result did not reach its queue (JobReporter.result's branches).
NOT_DELIVERED_REASONS = ("refused", "undeliverable", "expired")
#: What the audit reports lost with a removed orphan's progress and status queues.
MESSAGE_KINDS = (QueueKind.PROGRESS.value, QueueKind.STATUS.value)
#: A workflow this worker does not run, as a label: callers may send any name.
UNKNOWN_WORKFLOW = "unknown"


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    # Never in a registry of objects: the server reads every process's files instead.
    return Counter(name, doc, labels, registry=None)


def _latest(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    """A gauge whose value is the one last written by any process of the tree: a recycled pool
    process does not take it away."""
    return Gauge(name, doc, labels, multiprocess_mode="mostrecent", registry=None)


@dataclass(frozen=True)
class JobMetrics:
    started: Counter = field(
        default_factory=lambda: _counter(
            "ebb_jobs_started", "Job runs whose workflow began (each attempt)", ("workflow",)
        )
    )
    finished: Counter = field(
        default_factory=lambda: _counter(
            "ebb_jobs_finished", "Jobs ended, by their real outcome", ("workflow", "status")
        )
    )
    duration: Histogram = field(
        default_factory=lambda: Histogram(
            "ebb_job_duration_seconds",
            "From the task's start to its result published",
            ("workflow",),
            buckets=DURATION_BUCKETS,
            registry=None,
        )
    )
    #: Counted in live processes only: a killed pool process's job is dropped once it is dead.
    running: Gauge = field(
        default_factory=lambda: Gauge(
            "ebb_jobs_running", "Jobs running now", ("workflow",), multiprocess_mode="livesum", registry=None
        )
    )
    attempts_after_worker_lost: Counter = field(
        default_factory=lambda: _counter(
            "ebb_job_attempts_after_worker_lost",
            "Job runs redelivered because the worker running them died",
            ("workflow",),
        )
    )
    results_not_delivered: Counter = field(
        default_factory=lambda: _counter(
            "ebb_results_not_delivered",
            "Results the broker refused, could not deliver, or whose queue had expired",
            ("workflow", "reason"),
        )
    )


@dataclass(frozen=True)
class AuditCounters:
    """The audit's events, counted where they are logged (once across auditors), and its runs."""

    runs: Counter = field(
        default_factory=lambda: _counter("ebb_audit_runs", "Audits run, by outcome", ("outcome",))
    )
    orphans_found: Counter = field(
        default_factory=lambda: _counter("ebb_audit_orphans_found", "Orphaned job queues reported found")
    )
    orphans_removed: Counter = field(
        default_factory=lambda: _counter(
            "ebb_audit_orphans_removed", "Orphaned job queues reported removed by the broker"
        )
    )
    results_lost: Counter = field(
        default_factory=lambda: _counter(
            "ebb_results_lost", "Results that went undelivered with an orphan's result queue"
        )
    )
    messages_lost: Counter = field(
        default_factory=lambda: _counter(
            "ebb_messages_lost", "Progress and status messages that went with an orphan", ("kind",)
        )
    )


@dataclass(frozen=True)
class AuditGauges:
    """This worker's view at its last audit: made by its first audit, so that a worker that never
    audited shows none (rather than zeros that look like a clean broker)."""

    job_queues: Gauge = field(
        default_factory=lambda: _latest("ebb_job_queues", "Job queues by state at the last audit", ("state",))
    )
    oldest_waiting_age: Gauge = field(
        default_factory=lambda: _latest(
            "ebb_oldest_waiting_job_age_seconds",
            "Longest a job queue has been seen without a consumer, at the last audit",
        )
    )
    waiting_ttl_used: Gauge = field(
        default_factory=lambda: _latest(
            "ebb_waiting_job_ttl_used_ratio",
            "Largest share of its TTL an unconsumed job queue has used, at the last audit",
        )
    )
    expiry_policy_missing: Gauge = field(
        default_factory=lambda: _latest(
            "ebb_expiry_policy_missing", "1 when no operator policy expires jobs.* queues, at the last audit"
        )
    )
    duration: Gauge = field(
        default_factory=lambda: _latest("ebb_audit_last_duration_seconds", "How long the last audit took")
    )
    last_success: Gauge = field(
        default_factory=lambda: _latest(
            "ebb_audit_last_success_timestamp_seconds", "When the last successful audit ended"
        )
    )


@dataclass(frozen=True)
class BeatMetrics:
    sent: Counter = field(default_factory=lambda: _counter("ebb_audits_sent", "Audits beat sent"))


class _State:
    role: str | None = None
    jobs: JobMetrics | None = None
    audit: AuditCounters | None = None
    audit_gauges: AuditGauges | None = None
    beat: BeatMetrics | None = None
    beat_last_sent: Gauge | None = None
    #: Jobs this process counts as running, so that each is counted out exactly once.
    running: dict[uuid.UUID, str] = {}  # noqa: RUF012 (one per process, by design)


def enable(role: str, *, start_at_zero: bool = True) -> None:
    """Create the metrics of a ``worker`` or a ``beat`` (after the multiprocess directory is set),
    and start their counters at 0.

    Counters that first appear at 1 are invisible to ``increase()``: a worker's start at 0 lets
    the alert rules see its first orphan, its first failed audit, its first job of each outcome.
    A forked process calls it again (``start_at_zero=False``) to get metric files of its own.
    """
    _State.role, _State.running = role, {}
    _State.jobs = _State.audit = _State.audit_gauges = _State.beat = _State.beat_last_sent = None
    if role == "beat":
        _State.beat = BeatMetrics()
        if start_at_zero:
            _State.beat.sent.inc(0)
        return
    jobs, audit = _State.jobs, _State.audit = JobMetrics(), AuditCounters()
    if not start_at_zero:
        return
    for name in workflows.names():
        jobs.started.labels(name).inc(0)
        jobs.attempts_after_worker_lost.labels(name).inc(0)
        for status in (s for s in JobStatus if s is not JobStatus.RUNNING):
            jobs.finished.labels(name, status.value).inc(0)
        for reason in NOT_DELIVERED_REASONS:
            jobs.results_not_delivered.labels(name, reason).inc(0)
    for outcome in ("ok", "failed"):
        audit.runs.labels(outcome).inc(0)
    for counter in (audit.orphans_found, audit.orphans_removed, audit.results_lost):
        counter.inc(0)
    for kind in MESSAGE_KINDS:
        audit.messages_lost.labels(kind).inc(0)


def enabled() -> bool:
    return _State.role is not None


def _recorder(fn: Callable[P, None]) -> Callable[P, None]:
    """Runs ``fn`` only where metrics are on, and never lets it raise."""

    @functools.wraps(fn)
    def record(*args: P.args, **kwargs: P.kwargs) -> None:
        if _State.role is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # metrics must never break a job or an audit
            log_event(logger, logging.DEBUG, "metrics_failed", recorder=fn.__name__, error=repr(exc))

    return record


def _jobs() -> JobMetrics:
    if _State.jobs is None:
        raise RuntimeError(f"no job metrics in a {_State.role} process")
    return _State.jobs


def _audit() -> AuditCounters:
    if _State.audit is None:
        raise RuntimeError(f"no audit metrics in a {_State.role} process")
    return _State.audit


def _workflow(name: str) -> str:
    """The workflow as a label: a name this worker runs, else ``unknown`` (bounded cardinality)."""
    return name if workflows.runs(name) else UNKNOWN_WORKFLOW


# -- workers (tasks/job.py) ---------------------------------------------------------------------


@_recorder
def job_attempt(workflow: str, attempt: int, redelivered: bool) -> None:
    """A worker took a job; a redelivered run after the first was handed back by a dead worker."""
    if attempt > 1 and redelivered:
        _jobs().attempts_after_worker_lost.labels(_workflow(workflow)).inc()


@_recorder
def job_started(job_id: uuid.UUID, workflow: str) -> None:
    label = _workflow(workflow)
    _jobs().started.labels(label).inc()
    _jobs().running.labels(label).inc()
    _State.running[job_id] = label


@_recorder
def job_finished(job_id: uuid.UUID, workflow: str, status: JobStatus, started_monotonic: float) -> None:
    label = _workflow(workflow)
    _jobs().finished.labels(label, status.value).inc()
    _jobs().duration.labels(label).observe(max(0.0, time.monotonic() - started_monotonic))
    job_left(job_id)


@_recorder
def job_left(job_id: uuid.UUID | str) -> None:
    """The job's run is over (finished, or its task ended some other way): not running any more."""
    key = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(job_id)
    label = _State.running.pop(key, None)
    if label is not None:
        _jobs().running.labels(label).dec()


@_recorder
def result_not_delivered(workflow: str, reason: str) -> None:
    _jobs().results_not_delivered.labels(_workflow(workflow), reason).inc()


# -- the audit (tasks/audit.py, tasks/metrics_audit.py) -------------------------------------------


@_recorder
def orphans_found(count: int) -> None:
    _audit().orphans_found.inc(count)


@_recorder
def orphan_removed(kind: QueueKind | None, result_lost: bool, messages: int) -> None:
    """One ``orphan_removed``, with what it lost (as ``audit._what_was_lost`` judged it)."""
    _audit().orphans_removed.inc()
    if result_lost:
        _audit().results_lost.inc()
    elif kind is not None and kind.value in MESSAGE_KINDS and messages > 0:
        _audit().messages_lost.labels(kind.value).inc(messages)


def audit_metrics() -> tuple[AuditCounters, AuditGauges] | None:
    """The audit's counters and gauges where metrics are on (the gauges made on first use)."""
    if _State.audit is None:
        return None
    if _State.audit_gauges is None:
        _State.audit_gauges = AuditGauges()
    return _State.audit, _State.audit_gauges


# -- beat ---------------------------------------------------------------------------------------


@_recorder
def audit_sent() -> None:
    if _State.beat is None:
        raise RuntimeError(f"no beat metrics in a {_State.role} process")
    _State.beat.sent.inc()
    if _State.beat_last_sent is None:  # made on first use: none until beat sent one
        _State.beat_last_sent = _latest(
            "ebb_audit_last_sent_timestamp_seconds", "When beat last sent an audit"
        )
    _State.beat_last_sent.set(time.time())
