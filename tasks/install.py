"""Ebb on any Celery app: one call registers the job task, its signals and the queue audit.

Ebb's own app (``celery -A tasks``) is built with it, and so can be yours::

    from celery import Celery
    from tasks.install import install

    app = Celery("shop", broker="amqp://guest:guest@127.0.0.1//")
    install(app)   # ebb.run_job and ebb.audit_queues, reading EBB_* like Ebb's own workers

Your settings stay yours. Ebb's task gets what it needs as task options (late acks, JSON,
tracked start), its queue is added to the queues your workers consume, and the audit to your
beat schedule. A job message that is not JSON is refused before it is decoded, even when your
app accepts pickle for its own tasks.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.worker import strategy
from kombu.entity import Queue
from kombu.exceptions import ContentDisallowed

from ebb import contract, links
from ebb.config import Settings
from ebb.logfmt import log_event
from tasks import advertise as _advertise  # noqa: F401  (tells callers what this worker runs)
from tasks import final_events as _final_events  # noqa: F401  (Flower hears how redelivered jobs end)
from tasks import metrics_server, pidbox
from tasks import watching as _watching  # noqa: F401  (tells the pool whether events are watched)
from tasks.audit_task import AUDIT_TASK_NAME, audit_queues
from tasks.job import JobEnded, run_job

logger = logging.getLogger("ebb.worker")
AUDIT_SCHEDULE_ENTRY = "ebb-audit-queues"


def json_only_strategy(task: Any, app: Celery, consumer: Any, **kwargs: Any) -> Any:
    """Celery's own strategy for Ebb's task, behind a content-type check made before any decoding.

    Celery's default strategy reads ``message.payload`` first, which deserializes the body with
    whatever the app accepts: pickle would run code right there. This refuses a job message
    that is not JSON from its properties alone; raising ``ContentDisallowed`` makes Celery log
    it undecoded and reject it, as for content the app does not accept at all.
    """
    handle = strategy.default(task, app, consumer, **kwargs)

    def handle_json_only(message: Any, body: Any, *args: Any, **options: Any) -> Any:
        if message.content_type != contract.CONTENT_TYPE:
            reason = f"Ebb's task takes {contract.CONTENT_TYPE} only, not {message.content_type!r}"
            log_event(
                logger,
                logging.ERROR,
                "task_refused",
                task_id=(message.headers or {}).get("id"),
                content_type=message.content_type,
                reason=reason,
            )
            raise ContentDisallowed(reason)
        return handle(message, body, *args, **options)

    return handle_json_only


def install(app: Celery, settings: Settings | None = None, *, audit: bool = True) -> None:
    """Register ``ebb.run_job`` (and, with ``audit``, ``ebb.audit_queues`` on beat) on ``app``.

    ``settings`` are Ebb's own (``EBB_*``, read once from the environment by default); the
    broker must be the one callers use, ``EBB_BROKER_URL``. Safe to call twice.
    """
    settings = settings or Settings.from_env()
    # Over amqps, every broker of a failover list is checked against its own host name.
    app.amqp.Connection = links.BrokerConnection
    # A worker failing over to another node re-declares its remote-control queue without
    # meeting the lost node's lock on the old one (tasks/pidbox.py).
    pidbox.install(app)
    metrics_server.install(settings)  # EBB_METRICS_PORT: workers and beat serve Prometheus metrics
    app.task(
        name=contract.TASK_NAME,
        bind=True,
        ignore_result=True,
        throws=(JobEnded,),
        acks_late=True,  # a worker that dies hands the job back
        reject_on_worker_lost=True,
        track_started=True,
        serializer="json",
        Strategy="tasks.install:json_only_strategy",
    )(run_job)
    _consume(app, contract.task_queue(settings.task_queue, settings.task_queue_type))
    routes = {contract.TASK_NAME: {"queue": settings.task_queue}}
    if audit:
        app.task(name=AUDIT_TASK_NAME, ignore_result=True, serializer="json")(audit_queues)
        # A queue of its own, which every Ebb worker also reads: behind a backlog of jobs in the
        # task queue, audits expired unrun (the chaos run saw none for two minutes under load,
        # and orphans expire unreported). Here an audit waits for one free pool slot at most.
        queue = audit_queue_name(settings)
        _consume(app, contract.task_queue(queue, settings.task_queue_type))
        routes[AUDIT_TASK_NAME] = {"queue": queue}
        schedule = dict(app.conf.beat_schedule or {})
        schedule.setdefault(
            AUDIT_SCHEDULE_ENTRY,
            {
                "task": AUDIT_TASK_NAME,
                "schedule": settings.audit_interval,
                # Kept for three intervals: a late audit still runs; older ones make way.
                "options": {"expires": 3 * settings.audit_interval, "queue": queue},
            },
        )
        app.conf.beat_schedule = schedule
    app.conf.task_routes = _with_routes(app.conf.task_routes, routes)


def audit_queue_name(settings: Settings) -> str:
    """Where beat sends the audit: ``<EBB_TASK_QUEUE>.audit``."""
    return f"{settings.task_queue}.audit"


def _consume(app: Celery, queue: Queue) -> None:
    """Add Ebb's task queue to the queues ``app``'s workers read, next to the app's own."""
    queues = list(app.conf.task_queues or ())
    if any(q.name == queue.name for q in queues):
        return
    if not queues:  # Celery would have made the default queue alone: keep it
        default = app.conf.task_default_queue
        queues.append(Queue(default, routing_key=default))
    queues.append(queue)
    app.conf.task_queues = queues


def _with_routes(existing: Any, routes: dict[str, dict[str, str]]) -> Any:
    """Ebb's routes ahead of the app's own (a dict, or a list of routers)."""
    if not existing:
        return routes
    if isinstance(existing, dict):
        return {**existing, **routes}
    return [routes, *(existing if isinstance(existing, list | tuple) else [existing])]
