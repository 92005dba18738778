"""Whether anyone watches this worker's task events, shared with its pool processes.

Celery events cost RabbitMQ per job, so workers send them only while someone watches (Flower
turns them on with the ``enable_events`` remote control, or ``EBB_TASK_EVENTS=true`` from the
start). The worker's main process knows; the pool processes that run jobs do not, so the main
process mirrors it, once a second, into a flag in memory shared with the processes it forks.
The job task reads it before sending its own ``task-progress`` events.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

#: Created when the worker imports this module, before it forks its pool: shared with it.
_watched = multiprocessing.RawValue("b", 0)
_stop = threading.Event()
MIRROR_EVERY = 1.0


def watched() -> bool:
    """Do task events reach anyone right now (as far as this worker was told)?"""
    return bool(_watched.value)


def _events_on(consumer: Any) -> bool:
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not dispatcher.enabled:
        return False
    return not dispatcher.groups or "task" in dispatcher.groups


def _mirror(consumer: Any) -> None:
    while True:
        _watched.value = 1 if _events_on(consumer) else 0
        if _stop.wait(MIRROR_EVERY):
            return


def _on_ready(sender: Any = None, **_: Any) -> None:
    threading.Thread(target=_mirror, args=(sender,), name="ebb-watching", daemon=True).start()


def _on_shutdown(**_: Any) -> None:
    _stop.set()


worker_ready.connect(_on_ready, weak=False)
worker_shutdown.connect(_on_shutdown, weak=False)
