"""Ebb jobs on a Celery app of your own: one ``install(app)`` call, your settings untouched.

    celery -A examples.shop_app worker -l INFO        # runs shop.* tasks and Ebb jobs
    celery -A examples.shop_app beat                  # your schedule plus Ebb's queue audit

The worker reads your queue (``shop``) and Ebb's task queue (``EBB_TASK_QUEUE``); its broker
must be the one Ebb's callers use (``EBB_BROKER_URL``).
"""

from __future__ import annotations

import logging

from celery import Celery
from pydantic import BaseModel, Field

from ebb.config import Settings
from tasks.install import install
from tasks.workflows import Progress, workflow

logger = logging.getLogger(__name__)

app = Celery("shop")
app.conf.update(
    broker_url=Settings.from_env().broker_url,
    task_default_queue="shop",
    # Your own choices for your own tasks. Ebb's task stays JSON-only whatever you accept here.
    accept_content=["json", "pickle"],
    task_serializer="json",
    worker_prefetch_multiplier=1,  # with late acks, a prefetched job would wait behind a long one
    beat_schedule={"shop-nightly": {"task": "shop.add", "schedule": 86_400.0, "args": (0, 0)}},
)


@app.task(name="shop.add")  # type: ignore[untyped-decorator]
def add(x: int, y: int) -> int:
    """One of your own Celery tasks, untouched by Ebb."""
    return x + y


class InvoiceParams(BaseModel):
    customer: str = Field(description="Who is billed")
    lines: int = Field(1, ge=1, le=1000, description="How many invoice lines")


@workflow("shop.invoice", params=InvoiceParams)
def invoice(params: InvoiceParams, progress: Progress) -> dict[str, object]:
    """Render an invoice, a line at a time."""
    for line in range(1, params.lines + 1):
        progress(line / params.lines, f"line {line}/{params.lines}")
    return {"customer": params.customer, "lines": params.lines}


install(app)  # ebb.run_job, its signals, and ebb.audit_queues on beat
