"""Publishing to a job's reply queues without ever re-creating them.

Messages go to the default exchange with ``mandatory`` set and publisher confirms on: when a
job's queue has expired the broker returns the message before it confirms it, so a late
message is dropped and logged instead of resurrecting the queue.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import amqp.exceptions
from kombu.connection import Connection
from kombu.messaging import Producer

from ebb import contract
from ebb.config import Settings
from ebb.logfmt import log_event

logger = logging.getLogger("ebb.worker")

# Long enough to ride out a broker restart (about a minute) without losing a message.
RETRY_POLICY = {"max_retries": 40, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


class PublishRefused(Exception):
    """RabbitMQ refused a message (nack, or a channel error such as 406 "larger than max size")."""


class ReplyPublisher:
    """One confirming connection per worker process, shared by every job that process runs."""

    _instance: ReplyPublisher | None = None
    _instance_pid = 0
    _instance_lock = threading.Lock()

    def __init__(self, settings: Settings) -> None:
        self._connection = Connection(
            settings.broker_url,
            heartbeat=settings.heartbeat,
            transport_options={"confirm_publish": True},
        )
        self._returned: set[str] = set()
        self._producer = Producer(
            self._connection, serializer="json", auto_declare=False, on_return=self._on_return
        )
        self._lock = threading.Lock()

    @classmethod
    def for_process(cls, settings: Settings) -> ReplyPublisher:
        """The publisher of this process; a forked child never shares its parent's socket."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance_pid != os.getpid():
                cls._instance = cls(settings)
                cls._instance_pid = os.getpid()
            return cls._instance

    def _on_return(self, exception: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.add(routing_key)

    def publish(
        self, queue: str, payload: dict[str, Any], *, persistent: bool = True, body: bytes | None = None
    ) -> bool:
        """Publish to ``queue`` and wait for the confirm; ``False`` (and a warning) if it is gone.

        Connection failures are retried (``RETRY_POLICY``, about a minute); a message the broker
        refuses raises :class:`PublishRefused`, and the next publish gets a fresh channel.
        ``body``: ``payload`` already encoded (the caller measured it).
        """
        body = contract.encode(payload) if body is None else body
        with self._lock:
            self._returned.discard(queue)
            try:
                self._producer.publish(
                    body,
                    exchange="",
                    routing_key=queue,
                    mandatory=True,
                    delivery_mode=2 if persistent else 1,
                    content_type=contract.CONTENT_TYPE,
                    content_encoding="utf-8",
                    retry=True,
                    retry_policy=RETRY_POLICY,
                )
            except (amqp.exceptions.MessageNacked, amqp.exceptions.ChannelError) as exc:
                # A channel error closed the producer's channel: the next publish opens another.
                self._producer.revive(self._connection.channel())
                raise PublishRefused(f"RabbitMQ refused the message for {queue}: {exc!r}") from exc
            returned = queue in self._returned
            self._returned.discard(queue)
        if returned:
            parsed = contract.parse_queue_name(queue)
            log_event(
                logger,
                logging.WARNING,
                "message_dropped",
                job_id=parsed[0] if parsed else None,
                queue=queue,
                type=payload.get("type"),
                reason="queue no longer exists (TTL expired or deleted); not re-created",
            )
        return not returned
