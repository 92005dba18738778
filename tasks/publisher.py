"""Publishing to a job's reply queues without ever re-creating them.

Messages go to the default exchange with ``mandatory`` set and publisher confirms on: when a
job's queue has expired the broker returns the message before it confirms it, so a late
message is dropped and logged instead of resurrecting the queue.

When the queue's node is down, RabbitMQ 3 returns the message too (a passive declare then says
which node), RabbitMQ 4 nacks it and names no node anywhere over AMQP: the management API does
(``BrokerAPI.down_home``), asked once per result.

During a resource alarm (memory, disk) RabbitMQ blocks the connection at its first publish and
reads nothing more from it until the alarm clears; the message it was sent is confirmed then
(3.10 and 4.3 alike). The publish waits for that confirm however long the alarm lasts: another
connection would be blocked as well, and giving up would drop a result the broker holds. The
block and the unblock are logged, with the job whose message waits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import amqp
import amqp.exceptions
import kombu.exceptions
from kombu.messaging import Producer

from ebb import contract, links
from ebb.broker_replies import Present, Unreachable, probe_bound
from ebb.config import Settings
from ebb.logfmt import log_event
from ebb.sync import QueueProbes
from tasks.broker_api import BrokerAPI, ManagementError

logger = logging.getLogger("ebb.worker")

# Long enough to ride out a broker restart (about a minute) without losing a message.
RETRY_POLICY = {"max_retries": 40, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


class ResultUndeliverable(Exception):
    """The broker would not take the result for longer than the bound (its queue's node down)."""


class PublishRefused(Exception):
    """RabbitMQ refused a message (nack, or a channel error such as 406 "larger than max size")."""


class ReplyPublisher:
    """One confirming connection per worker process, shared by every job that process runs."""

    _instance: ReplyPublisher | None = None
    _instance_pid = 0
    _instance_lock = threading.Lock()

    def __init__(self, settings: Settings) -> None:
        self._connection = links.broker_connection(
            settings,
            heartbeat=settings.heartbeat,
            transport_options={
                "confirm_publish": True,
                "on_blocked": self._on_blocked,
                "on_unblocked": self._on_unblocked,
            },
        )
        self._publishing: str | None = None  # the queue whose message waits for its confirm
        self._blocked_at: float | None = None
        self._returned: set[str] = set()
        self._producer = Producer(
            self._connection, serializer="json", auto_declare=False, on_return=self._on_return
        )
        self._lock = threading.Lock()
        self._settings = settings
        self._probes = QueueProbes(self._open_channel, self._read_until)
        self._probes_of: object = None  # the py-amqp connection the probe channels belong to
        self._api: BrokerAPI | None = None

    @classmethod
    def for_process(cls, settings: Settings) -> ReplyPublisher:
        """The publisher of this process; a forked child never shares its parent's socket."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance_pid != os.getpid():
                cls._instance = cls(settings)
                cls._instance_pid = os.getpid()
            return cls._instance

    def _on_blocked(self, reason: str) -> None:
        """RabbitMQ's ``connection.blocked``, read while a confirm is awaited: a silent wait of
        unknown length otherwise. (py-amqp drops RabbitMQ's reason and passes a fixed one.)"""
        self._blocked_at = time.monotonic()
        queue = self._publishing
        log_event(
            logger,
            logging.WARNING,
            "publish_blocked",
            job_id=_job_of(queue),
            queue=queue,
            reason="RabbitMQ blocked the connection: a resource alarm is raised (rabbitmq-diagnostics "
            "alarms); the message is confirmed once it clears",
        )

    def _on_unblocked(self) -> None:
        queue = self._publishing
        held = None if self._blocked_at is None else round(time.monotonic() - self._blocked_at, 2)
        self._blocked_at = None
        log_event(
            logger, logging.INFO, "publish_unblocked", job_id=_job_of(queue), queue=queue, blocked_s=held
        )

    def _on_return(self, exception: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.add(routing_key)

    def publish(
        self,
        queue: str,
        message: contract.Message,
        *,
        persistent: bool = True,
        keep_trying_for: float = 0.0,
    ) -> bool:
        """Publish to ``queue`` and wait for the confirm; ``False`` (and a warning) if it is gone.

        Connection failures are retried (``RETRY_POLICY``, about a minute, through the failover
        list). With ``keep_trying_for`` (the result), a message the broker nacks or returns while
        its queue's node is down is tried again until that many seconds passed, then
        :class:`ResultUndeliverable`; a queue that is really gone is not waited for. A message
        refused for good (a 406: too large, say) raises :class:`PublishRefused`.
        """
        body = contract.encode_message(message)
        job_id = _job_of(queue)
        deadline = time.monotonic() + keep_trying_for
        delay = 0.5
        nacked: str | None = None  # why a nack, looked up once
        while True:
            outcome = self._publish_once(queue, body, persistent)
            if outcome == "confirmed":
                return True
            reason = "RabbitMQ nacked it"
            if outcome == "returned" and keep_trying_for <= 0:
                reason = "queue no longer exists (TTL expired or deleted) or its node is down; not re-created"
            elif outcome == "returned":
                state = self._queue_state(queue)
                if state is None:  # gone: expired or deleted, never re-created
                    reason = "queue no longer exists (TTL expired or deleted); not re-created"
                    keep_trying_for = 0
                else:
                    node = state.node or self._down_home(queue)
                    reason = f"its queue is on RabbitMQ node {node or '?'}, which is down or unreachable"
            elif keep_trying_for > 0:  # nacked: RabbitMQ 4's answer when the queue's node is down
                if nacked is None:
                    node = self._down_home(queue)
                    nacked = (
                        f"{reason}: its queue is on RabbitMQ node {node}, which is down" if node else reason
                    )
                reason = nacked
            if keep_trying_for <= 0:  # progress and status, or a queue that is gone: no wait
                log_event(
                    logger,
                    logging.WARNING,
                    "message_dropped",
                    job_id=job_id,
                    queue=queue,
                    type=contract.message_type(message),
                    reason=reason,
                )
                return False
            if time.monotonic() + delay > deadline:
                raise ResultUndeliverable(f"{reason}, for more than {keep_trying_for:g} s (EBB_RESULT_RETRY)")
            log_event(
                logger,
                logging.WARNING,
                "publish_retrying",
                job_id=job_id,
                queue=queue,
                reason=reason,
                retry_in_s=delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _publish_once(self, queue: str, body: bytes, persistent: bool) -> str:
        """``confirmed``, ``returned`` (unroutable: ``mandatory``) or ``nacked``."""
        with self._lock:
            self._returned.discard(queue)
            self._publishing = queue
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
            except amqp.exceptions.MessageNacked:
                return "nacked"
            except kombu.exceptions.OperationalError as exc:
                if isinstance(exc.__cause__, amqp.exceptions.MessageNacked):  # kombu wraps a nack
                    return "nacked"
                raise
            except amqp.exceptions.ChannelError as exc:
                # A channel error closed the producer's channel: the next publish opens another.
                self._producer.revive(self._connection.channel())
                raise PublishRefused(f"RabbitMQ refused the message for {queue}: {exc!r}") from exc
            finally:
                self._publishing = None
            returned = queue in self._returned
            self._returned.discard(queue)
        return "returned" if returned else "confirmed"

    def _queue_state(self, queue: str) -> Unreachable | None:
        """Why a message came back: ``None`` if the queue is gone, else where it is out of reach.

        A passive declare (never an active one: a job queue is never re-created), on a channel
        of its own since a 404 closes it, and bounded as the clients bound theirs
        (``QueueProbes``). It would renew the lease of a queue that exists, but a queue that
        exists and is reachable does not return messages.
        """
        with self._lock:
            connection = self._connection.connection  # connects if need be
            if connection is not self._probes_of:
                self._probes.reset()
                self._probes_of = connection
            found = self._probes.probe([queue], probe_bound(self._settings.broker_timeout))[queue]
        if isinstance(found, Present):
            return Unreachable(None)  # it exists: returned while its node was failing over
        return found

    def _open_channel(self) -> amqp.Channel:
        transport = self._connection.connection.transport
        with transport.having_timeout(self._settings.broker_timeout):
            return self._connection.channel()

    def _read_until(self, done: Callable[[], bool], bound: float) -> bool:
        deadline = time.monotonic() + bound
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                self._connection.connection.drain_events(timeout=min(0.25, remaining))
        return True

    def _down_home(self, queue: str) -> str | None:
        """The node holding ``queue`` if it is down, from the management API; ``None`` if it
        cannot tell (no API, or the queue's node runs)."""
        try:
            if self._api is None:
                self._api = BrokerAPI(self._settings, timeout=5.0)
            return self._api.down_home(queue)
        except (ManagementError, ValueError) as exc:
            log_event(logger, logging.INFO, "queue_node_unknown", queue=queue, error=exc)
            return None


def _job_of(queue: str | None) -> uuid.UUID | None:
    """The job a reply queue belongs to (``None`` for another queue)."""
    parsed = contract.parse_queue_name(queue) if queue else None
    return parsed[0] if parsed else None
