"""Bare Celery app for the benchmark baseline: what Ebb costs is measured against plain Celery.

Same RabbitMQ as Ebb (EBB_BROKER_URL), Celery results in the Redis of EBB_REDIS_URL, JSON only,
Celery defaults otherwise. The worker is started by ``bench/bench_jobs.py`` as
``celery -A bench.celery_baseline worker -Q <queue>``. Results go to database 15 of that Redis (a
spare one, so the job registry is untouched); ``BENCH_RESULT_BACKEND`` overrides the whole URL.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from celery import Celery

from ebb.config import Settings

SETTINGS = Settings.from_env()
RESULT_BACKEND = os.environ.get("BENCH_RESULT_BACKEND") or urlunsplit(
    urlsplit(SETTINGS.redis_url)._replace(path="/15")
)

app = Celery("ebb-bench-baseline", broker=SETTINGS.broker_url, backend=RESULT_BACKEND)
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
