"""Bare Celery app for the benchmark baseline: what Ebb costs is measured against plain Celery.

Same RabbitMQ as Ebb, Celery results in Redis, JSON only, Celery defaults otherwise. The worker
is started by ``bench/bench_jobs.py`` as ``celery -A bench.celery_baseline worker -Q <queue>``.
``BENCH_RESULT_BACKEND`` picks the Redis database (a spare one, so the job registry is untouched).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from ebb.config import Settings

RESULT_BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/15")

app = Celery("ebb-bench-baseline", broker=Settings.from_env().broker_url, backend=RESULT_BACKEND)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    result_expires=600,  # results the bench never fetched (Ctrl-C) leave Redis on their own
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.echo")  # type: ignore[untyped-decorator]
def echo(value: Any) -> Any:
    """Return the argument: the cheapest Celery round trip, the twin of ``demo.echo``."""
    return value
