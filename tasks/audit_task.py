"""The audit as a Celery task, run by beat every ``EBB_AUDIT_INTERVAL`` seconds."""

from __future__ import annotations

from typing import Any

from ebb.config import Settings
from tasks import metrics_audit
from tasks.audit import Auditor

AUDIT_TASK_NAME = "ebb.audit_queues"


def audit_queues() -> dict[str, Any]:
    """Return the counts, so Flower shows what each run found (registered by ``install``)."""
    with metrics_audit.recorded() as record:  # Prometheus: outcome, duration, what it found
        report = Auditor(Settings.from_env()).run()
        record(report)
    return {"duration_s": round(report.duration_s, 3), **report.counts()}
