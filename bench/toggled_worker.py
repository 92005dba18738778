"""Ebb's worker app with per-step toggles for ``bench/bench_toggles.py`` (never for production).

``celery -A bench.toggled_worker worker``: the same app as ``celery -A tasks``, with the steps
named in ``EBB_BENCH_TOGGLES`` (comma separated) switched back or off, so that one bench run
can measure each step on and off against the same code:

- ``no_final_status``: the final status is not sent (the result carries it; a contract change,
  measured only)
- ``transient_result``: the result is transient (breaks "never lost": measured only, to show
  what the guarantee costs)
"""

from __future__ import annotations

import os
from typing import Any

from ebb.contract import JobStatus
from tasks import app, job
from tasks.publisher import ReplyPublisher

TOGGLES = {name for name in os.environ.get("EBB_BENCH_TOGGLES", "").split(",") if name}
KNOWN = {"no_final_status", "transient_result"}
if TOGGLES - KNOWN:
    raise SystemExit(f"unknown EBB_BENCH_TOGGLES {sorted(TOGGLES - KNOWN)}; known: {sorted(KNOWN)}")

if "no_final_status" in TOGGLES:
    _status = job.JobReporter.status

    def _status_unless_final(self: job.JobReporter, status: JobStatus) -> None:
        if status is JobStatus.RUNNING:
            _status(self, status)

    job.JobReporter.status = _status_unless_final  # type: ignore[method-assign]

if "transient_result" in TOGGLES:
    _publish = ReplyPublisher.publish

    def _transient(self: ReplyPublisher, queue: str, message: Any, **options: Any) -> bool:
        return _publish(self, queue, message, **{**options, "persistent": False})

    ReplyPublisher.publish = _transient  # type: ignore[method-assign]

__all__ = ["app"]
