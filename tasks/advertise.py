"""A worker tells callers which workflows it runs, for as long as it is alive."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from ebb import links
from ebb.config import Settings
from ebb.logfmt import log_event
from ebb.workers import ADVERTISE_EVERY, ADVERTISE_EXPIRY, advert_key, advertisement
from tasks import workflows

logger = logging.getLogger("ebb.worker")
_stop = threading.Event()
_advertised: list[str] = []


def _key(hostname: str, settings: Settings) -> str:
    return advert_key(settings.vhost, hostname)


def _advertise(client: redis.Redis, hostname: str, settings: Settings) -> None:
    try:
        client.set(
            _key(hostname, settings),
            advertisement(hostname, settings.task_queue, workflows.describe(), settings.vhost),
            ex=ADVERTISE_EXPIRY,
        )
    except redis.RedisError as exc:
        log_event(logger, logging.WARNING, "advertise_failed", worker=hostname, error=repr(exc))


def _advertise_forever(client: redis.Redis, hostname: str, settings: Settings) -> None:
    while not _stop.wait(ADVERTISE_EVERY):
        _advertise(client, hostname, settings)


def _on_ready(sender: Any = None, **_: Any) -> None:
    hostname = str(getattr(sender, "hostname", "unknown"))
    settings = Settings.from_env()
    consumed = {q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", None) or ()}
    if consumed and settings.task_queue not in consumed:
        # A worker of an app with Ebb installed but started with -Q elsewhere runs no jobs:
        # advertising would send callers' jobs to a queue nobody here reads.
        log_event(
            logger,
            logging.WARNING,
            "workflows_not_advertised",
            worker=hostname,
            queue=settings.task_queue,
            reason="this worker does not consume Ebb's task queue",
        )
        return
    _advertised.append(hostname)
    # The first advert before the worker says it is ready (Celery logs "ready." after this
    # signal): a caller that saw the worker ready never finds its workflows unknown.
    client = links.redis_client(settings, timeout=2)
    _advertise(client, hostname, settings)
    threading.Thread(
        target=_advertise_forever, args=(client, hostname, settings), name="ebb-advertise", daemon=True
    ).start()


def _on_shutdown(**_: Any) -> None:
    """Withdraw at once, so callers stop sending this worker's workflows nowhere."""
    _stop.set()
    settings = Settings.from_env()
    client = links.redis_client(settings, timeout=2)
    for hostname in _advertised:
        with contextlib.suppress(redis.RedisError):
            client.delete(_key(hostname, settings))


worker_ready.connect(_on_ready, weak=False)
worker_shutdown.connect(_on_shutdown, weak=False)
