"""A job that ends unwatched after Flower saw it run still ends in Flower: its last event is sent.

Workers send task events only while someone watches (``tasks/watching.py``). A job Flower saw
received or running, on a worker that then died or lost its connection, is run again by
another worker, perhaps one just started whose events are not on yet: without a word from it,
Flower would show the job running for ever. So when a redelivered job ends and this process
has not heard that anyone watches, it sends the job's terminal event itself (``task-succeeded``
or ``task-failed``, as Celery's worker would). When nobody watches it is one transient message
to an exchange with no queue bound, for redelivered jobs only. (Ebb's ``task-cancelled`` and
``task-timeout`` are always sent, by ``tasks/job.py``; caller ``task-sent`` events are never
sent, ``ebb/celery_wire.py``.)
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import states
from celery.signals import task_postrun, task_prerun
from celery.utils.saferepr import saferepr

from ebb import contract
from ebb.logfmt import log_event
from tasks import watching

logger = logging.getLogger("ebb.worker")
_started: dict[str, float] = {}


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is not None and task.name == contract.TASK_NAME and task_id:
        _started[task_id] = time.monotonic()


def _on_postrun(
    task_id: str | None = None, task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    began = _started.pop(task_id or "", None)
    if task is None or task.name != contract.TASK_NAME or watching.watched():
        return  # the worker's main process tells Flower (when anyone watches)
    if not (task.request.delivery_info or {}).get("redelivered"):
        return  # never shown running by another worker's events: nothing to put right
    runtime = round(time.monotonic() - began, 3) if began is not None else 0.0
    try:
        if state == states.SUCCESS:
            task.send_event("task-succeeded", result=saferepr(retval), runtime=runtime)
        elif state == states.FAILURE:
            task.send_event("task-failed", exception=saferepr(retval), traceback="")
    except Exception as exc:  # monitoring must never break a job
        log_event(logger, logging.DEBUG, "task_event_failed", job_id=task_id, error=repr(exc))


task_prerun.connect(_on_prerun, weak=False)
task_postrun.connect(_on_postrun, weak=False)
