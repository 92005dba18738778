"""What one audit run tells Prometheus: its outcome, duration, and the state it found.

The gauges are this worker's view at its last audit. The audit runs on whichever worker takes
it, so every worker's gauges carry ``ebb_audit_last_success_timestamp_seconds`` beside them, and
the alert rules (deploy/ebb-alerts.yml) read the gauges of the worker whose audit is newest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ebb.logfmt import log_event
from tasks import metrics
from tasks.audit import IN_USE, NEW, NO_EXPIRY, NODE_DOWN, ORPHANED, SUSPECT, AuditReport

logger = logging.getLogger("ebb.metrics")

#: The audit's queue states as ``ebb_job_queues{state=...}`` labels.
STATE_LABELS = {
    IN_USE: "in_use",
    SUSPECT: "unused",  # no consumer, not yet for the 12 s that make it an orphan
    ORPHANED: "orphaned",
    NO_EXPIRY: "without_expiry",
    NODE_DOWN: "on_down_node",
    NEW: "new",  # listed without a consumer count yet: judged next run
}
#: States of a queue that waits for its caller to come back.
WAITING = (SUSPECT, ORPHANED)


@contextmanager
def recorded() -> Iterator[Callable[[AuditReport], None]]:
    """Around one audit run: count it ok or failed, time it; the run hands its report in."""
    started = time.monotonic()
    try:
        yield _record_report
    except BaseException:
        _record_run("failed", time.monotonic() - started)
        raise
    _record_run("ok", time.monotonic() - started)


def _record_run(outcome: str, duration_s: float) -> None:
    try:
        found = metrics.audit_metrics()
        if found is None:
            return
        counters, gauges = found
        counters.runs.labels(outcome).inc()
        gauges.duration.set(duration_s)
        if outcome == "ok":
            gauges.last_success.set(time.time())
    except Exception as exc:  # metrics must never break an audit
        log_event(logger, logging.DEBUG, "metrics_failed", recorder="audit_run", error=repr(exc))


def _record_report(report: AuditReport) -> None:
    try:
        found = metrics.audit_metrics()
        if found is None:
            return
        gauges = found[1]
        counts = report.counts()
        for state, label in STATE_LABELS.items():
            gauges.job_queues.labels(label).set(counts.get(state, 0))
        waiting = [f for f in report.findings if f.state in WAITING and f.idle_s is not None]
        gauges.oldest_waiting_age.set(max((f.idle_s or 0.0 for f in waiting), default=0.0))
        gauges.waiting_ttl_used.set(
            max(((f.idle_s or 0.0) / f.expires_s for f in waiting if f.expires_s), default=0.0)
        )
        gauges.expiry_policy_missing.set(1 if report.expiry_policy is None else 0)
    except Exception as exc:  # metrics must never break an audit
        log_event(logger, logging.DEBUG, "metrics_failed", recorder="audit_report", error=repr(exc))
