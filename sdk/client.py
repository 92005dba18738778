"""``JobClient``: submit jobs, watch them, reconnect to them, and clean their queues up."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from amqp import Channel, Message
from amqp.exceptions import NotFound
from celery import Celery
from kombu.connection import Connection
from kombu.messaging import Producer

from sdk import contract
from sdk.config import Settings
from sdk.contract import JobResult, ProgressUpdate, QueueKind, StatusUpdate
from sdk.errors import (
    BrokerUnavailableError,
    CallbackError,
    ClientClosedError,
    JobQueuesExpiredError,
    UnknownJobError,
    UnknownWorkflowError,
)
from sdk.job import Job, validate_ttl
from sdk.logfmt import log_event
from sdk.loop import BrokerLoop
from sdk.registry import JobRecord, Registry, RegistryUnavailableError
from sdk.workers import WorkflowInfo, list_workflows

logger = logging.getLogger("ebb.sdk")

OnFinished = Callable[[Job, JobResult], Any]
OnProgress = Callable[[Job, ProgressUpdate], Any]
OnStatus = Callable[[Job, StatusUpdate], Any]

#: How long a result waits for status/progress messages it overtook in the broker.
STRAGGLER_GRACE = 2.0
#: Finished jobs remembered for ``wait``; older ones are forgotten first.
FINISHED_MEMORY = 10_000


@dataclass(eq=False)
class _Watch:
    """What the client knows about one job it is connected to."""

    job: Job
    on_finished: OnFinished | None
    on_progress: OnProgress | None
    on_status: OnStatus | None
    auto_disconnect: bool
    consumers: dict[QueueKind, str] = field(default_factory=dict)
    kinds: frozenset[QueueKind] = frozenset()
    attempt: int = 1
    last_seq: dict[QueueKind, int] = field(default_factory=dict)
    pending: tuple[JobResult, Message] | None = None
    pending_since: float = 0.0
    result: JobResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class JobClient:
    """A caller's connection to Ebb: one AMQP connection and one consumer thread for all its jobs.

    Callbacks (``on_finished``, ``on_progress``, ``on_status``) run on the client's consumer
    thread, one at a time, in arrival order per queue. Keep them short; they may call
    ``submit_job``/``connect_to_submitted_job`` but not ``wait`` or ``close``.
    """

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None) -> None:
        base = settings or Settings.from_env()
        if broker_url is not None:
            base = Settings(**{**base.__dict__, "broker_url": broker_url})
        self.settings = base
        self._registry = Registry(base.redis_url, base.registry_grace)
        self._known_workflows: set[str] = set()
        self._returned: dict[str, bool] = {}
        self._watches: dict[uuid.UUID, _Watch] = {}
        self._finished: OrderedDict[uuid.UUID, _Watch] = OrderedDict()
        self._inbox: deque[tuple[_Watch, QueueKind, Message]] = deque()
        self._tags = 0
        self._lock = threading.Lock()
        self._cleanup_pending: dict[uuid.UUID, set[QueueKind]] = {}
        self._consume_channel: Channel
        self._publish_channel: Channel
        self._probe_channel: Channel | None = None
        self._producer: Producer
        self._celery = _sender_app(base)
        self._task_queue = contract.task_queue(base.task_queue)
        self._loop = BrokerLoop(
            self._open_connection,
            on_connected=self._on_connected,
            after_io=self._after_io,
            on_failure=self._on_connection_lost,
            reconnect_timeout=base.reconnect_timeout,
        )
        try:
            self._loop.start()
        except Exception as exc:
            raise BrokerUnavailableError(
                f"cannot reach RabbitMQ at {_safe_url(base.broker_url)}: {exc}. Start the broker or "
                "set EBB_BROKER_URL."
            ) from exc

    def _open_connection(self) -> Connection:
        connection = Connection(
            self.settings.broker_url,
            heartbeat=self.settings.heartbeat,
            transport_options={"confirm_publish": True},
            connect_timeout=10,
        )
        connection.ensure_connection(max_retries=1)
        return connection

    def _on_connected(self, connection: Connection, reconnected: bool) -> None:
        """Open the channels; after a reconnect, resume every job this client was watching."""
        self._consume_channel = connection.channel()
        self._consume_channel.basic_qos(0, 0, False)
        self._publish_channel = connection.channel()
        self._probe_channel = None
        self._producer = self._make_producer()
        if not reconnected:
            return
        self._inbox.clear()  # unacked deliveries of the old channel come again
        for job_id, kinds in list(self._cleanup_pending.items()):
            self._delete_queues(job_id, kinds)
        for watch in list(self._watches.values()):
            watch.consumers.clear()
            watch.pending = None
            if watch.done.is_set():
                continue  # result already handled; only its leftover queues remain (TTL)
            present = self._probe_queues(watch.job.id, set(watch.kinds), connection)
            if QueueKind.RESULT not in present:
                watch.error = JobQueuesExpiredError(watch.job.id, "They vanished while disconnected.")
                self._retire(watch)
                watch.done.set()
                continue
            self._consume(watch, present)
        log_event(logger, logging.INFO, "jobs_resumed", jobs=len(self._watches))

    # --- public API ----------------------------------------------------------------------

    def submit_job(
        self,
        workflow: str,
        params: Mapping[str, Any] | None = None,
        *,
        on_finished: OnFinished | None = None,
        on_progress: OnProgress | None = None,
        on_status: OnStatus | None = None,
        auto_disconnect_on_result: bool = True,
        auto_cleanup_after_ttl: timedelta | float | None = None,
        reference: str | None = None,
        job_timeout: timedelta | float | None = None,
    ) -> Job:
        """Declare the job's queues, then publish it; return once the broker has accepted both.

        Only the queues you asked callbacks for are created (the result queue always is).
        ``job_timeout`` limits the job's running time (time spent queued does not count); a job
        that runs longer is stopped and ends with status TIMEOUT.
        """
        if not isinstance(workflow, str) or not workflow:
            raise ValueError(f"workflow must be a non-empty string, not {workflow!r}")
        params_dict = dict(params or {})
        try:
            size = len(contract.encode(params_dict))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"params for {workflow!r} must be JSON-serialisable: {exc}") from None
        if size > self.settings.max_params_bytes:
            raise ValueError(
                f"params for {workflow!r} are {size} bytes as JSON, over the limit of "
                f"{self.settings.max_params_bytes} (EBB_MAX_PARAMS_BYTES); pass a reference "
                "(a path, a URL, a key) instead of the data itself"
            )
        ttl = validate_ttl(
            auto_cleanup_after_ttl, default=self.settings.default_ttl, maximum=self.settings.max_ttl
        )
        timeout = _timeout_seconds(job_timeout)
        self._check_workflow(workflow)
        queues = {QueueKind.RESULT}
        if on_progress is not None:
            queues.add(QueueKind.PROGRESS)
        if on_status is not None:
            queues.add(QueueKind.STATUS)
        job = Job(id=uuid.uuid4(), workflow=workflow, ttl=ttl, queues=frozenset(queues), reference=reference)
        watch = _Watch(job, on_finished, on_progress, on_status, auto_disconnect_on_result)
        request = contract.TaskRequest(job.id, workflow, params_dict, job.queues, ttl, timeout)
        now = time.time()
        # Written before the task exists, so the worker's RUNNING can never be overwritten.
        self._registry.write(
            job.id,
            ttl,
            {
                "workflow": workflow,
                "reference": reference,
                "status": "SUBMITTED",
                "submitted_at": now,
                "result_delivered": False,
                "queues_last_in_use": now,
            },
        )
        try:
            self._loop.call(lambda: self._submit_on_loop(watch, request))
        except BaseException:
            self._registry.write(job.id, ttl, {"status": "NOT_SUBMITTED"})
            raise
        log_event(logger, logging.INFO, "job_submitted", job_id=job.id, workflow=workflow, ttl=ttl)
        return job

    def connect_to_submitted_job(
        self,
        job: Job | uuid.UUID | str,
        *,
        on_finished: OnFinished | None = None,
        on_progress: OnProgress | None = None,
        on_status: OnStatus | None = None,
        auto_disconnect_on_result: bool = True,
        auto_cleanup_after_ttl: timedelta | float | None = None,
    ) -> Job:
        """Reattach to a job submitted earlier, here or by another process, and receive what waited.

        Queues are only probed (passive declare), never re-declared: their ``x-expires`` stays
        what it was at submission, because RabbitMQ cannot change it on an existing queue. A
        different ``auto_cleanup_after_ttl`` is validated, logged as ignored, and not applied.
        Raises :class:`JobQueuesExpiredError` when the result queue no longer exists.
        """
        known = job if isinstance(job, Job) else None
        job_id = known.id if known else contract.parse_job_id(job)
        if auto_cleanup_after_ttl is not None:
            requested = validate_ttl(
                auto_cleanup_after_ttl,
                default=self.settings.default_ttl,
                maximum=self.settings.max_ttl,
            )
            if known is None or requested != known.ttl:
                log_event(
                    logger,
                    logging.WARNING,
                    "ttl_not_changed",
                    job_id=job_id,
                    requested_ttl=requested,
                    kept_ttl=known.ttl if known else "as submitted",
                    reason="x-expires is fixed when a queue is declared",
                )
        wanted = {QueueKind.RESULT}
        if on_progress is not None:
            wanted.add(QueueKind.PROGRESS)
        if on_status is not None:
            wanted.add(QueueKind.STATUS)
        if known is not None and not wanted <= known.queues:
            missing = ", ".join(sorted(k.value for k in wanted - known.queues))
            raise ValueError(
                f"job {job_id} was submitted without a {missing} queue, so there is nothing to "
                f"deliver to that callback; drop it or submit with it next time"
            )

        def connect() -> Job:
            if job_id in self._watches:
                raise ValueError(f"job {job_id} is already connected to this client")
            present = self._probe_queues(job_id, wanted)
            if QueueKind.RESULT not in present:
                raise JobQueuesExpiredError(job_id, self._registry_story(job_id))
            for kind in wanted - present:
                log_event(
                    logger,
                    logging.WARNING,
                    "queue_missing",
                    job_id=job_id,
                    queue=contract.queue_name(job_id, kind),
                    detail="job was submitted without it; its callback will not be called",
                )
            handle = known or Job(
                id=job_id,
                workflow="?",
                ttl=self.settings.default_ttl,
                queues=frozenset(QueueKind),  # unknown: cleanup covers all three names
            )
            watch = _Watch(handle, on_finished, on_progress, on_status, auto_disconnect_on_result)
            self._consume(watch, present)
            return handle

        handle = self._loop.call(connect)
        if known is None:
            handle = self._describe_from_registry(handle)
        self._registry.write(handle.id, handle.ttl, {"queues_last_in_use": time.time()})
        log_event(logger, logging.INFO, "job_connected", job_id=job_id)
        return handle

    def list_workflows(self) -> list[WorkflowInfo]:
        """Workflows the live workers on this client's task queue advertise (read from Redis)."""
        try:
            found = list_workflows(self._registry.client, self.settings.task_queue)
        except redis.RedisError as exc:
            raise RegistryUnavailableError(f"cannot list workflows: Redis unreachable ({exc})") from exc
        self._known_workflows = {w.name for w in found}
        return found

    def _check_workflow(self, workflow: str) -> None:
        """Refuse a workflow no live worker runs, before any queue exists; degrade if Redis is down."""
        if not self.settings.check_workflows or workflow in self._known_workflows:
            return
        try:
            found = self.list_workflows()
        except RegistryUnavailableError as exc:
            log_event(logger, logging.WARNING, "workflow_check_skipped", workflow=workflow, error=exc)
            return
        known = [w.name for w in found]
        if workflow in known:
            return
        if not found and self._task_queue_consumers() > 0:
            # Workers are there but none has advertised (Redis restarted and lost the keys; they
            # re-advertise within ADVERTISE_EVERY): let the worker judge the workflow.
            log_event(
                logger, logging.WARNING, "workflow_check_skipped", workflow=workflow, reason="no adverts"
            )
            return
        raise UnknownWorkflowError(workflow, known, self.settings.task_queue)

    def _task_queue_consumers(self) -> int:
        """Workers reading the task queue, asked with a passive declare (the workers' queue, no TTL)."""

        def probe() -> int:
            if self._probe_channel is None:
                self._probe_channel = self._loop_connection().channel()
            try:
                ok = self._probe_channel.queue_declare(self.settings.task_queue, passive=True)
            except NotFound:
                self._probe_channel = None
                return 0
            return int(ok.consumer_count)

        return self._loop.call(probe)

    def cancel_job(self, job: Job | uuid.UUID | str) -> None:
        """Ask for the job to stop: a queued job never starts, a running one is interrupted.

        Returns at once; the caller then receives status CANCELLED and a CANCELLED result on the
        job's queues, which are cleaned up as for any result. A job that already finished keeps
        its result. Needs the registry (Redis): raises ``RegistryUnavailableError`` without it.
        """
        job_id = job.id if isinstance(job, Job) else contract.parse_job_id(job)
        record = self._registry.get(job_id)
        if record is None:
            raise UnknownJobError(job_id)
        if record.ttl is None or not self._registry.write(
            job_id, record.ttl, {"cancel_requested_at": time.time()}
        ):
            raise RegistryUnavailableError(f"could not record the cancellation of job {job_id} in Redis")
        log_event(logger, logging.INFO, "job_cancel_requested", job_id=job_id, status=record.status)

    def job_status(self, job: Job | uuid.UUID | str) -> JobRecord:
        """What the registry knows of a job, read from Redis without touching its queues.

        Never renews the queues' TTL. Raises :class:`UnknownJobError` for a job the registry
        has no record of, ``RegistryUnavailableError`` when Redis cannot be reached.
        """
        job_id = job.id if isinstance(job, Job) else contract.parse_job_id(job)
        record = self._registry.get(job_id)
        if record is None:
            raise UnknownJobError(job_id)
        return record

    def _registry_story(self, job_id: uuid.UUID) -> str:
        try:
            record = self._registry.get(job_id)
        except Exception as exc:  # the error is about the queues; the registry only adds colour
            return f"(The job registry could not be asked: {exc}.)"
        if record is None:
            return "The job registry has no record of it either: never submitted, or long forgotten."
        return f"Registry: {record.story()}."

    def _describe_from_registry(self, handle: Job) -> Job:
        try:
            record = self._registry.get(handle.id)
        except Exception:
            return handle
        if record is None:
            return handle
        return Job(
            id=handle.id,
            workflow=record.workflow or handle.workflow,
            ttl=record.ttl or handle.ttl,
            queues=handle.queues,
            reference=record.reference,
        )

    def disconnect_from_submitted_job(
        self, job: Job | uuid.UUID | str, *, delete_queues: bool | None = None
    ) -> None:
        """Stop listening to a job.

        By default its remaining queues are deleted if its result was already received, and
        kept otherwise (their TTL starts, so you can reconnect until it runs out). Pass
        ``delete_queues=True`` to abandon an unfinished job's queues, ``False`` to keep them.
        """
        job_id = job.id if isinstance(job, Job) else contract.parse_job_id(job)

        def disconnect() -> timedelta:
            watch = self._watches.get(job_id)
            if watch is None:
                raise ValueError(f"job {job_id} is not connected to this client")
            delete = watch.result is not None if delete_queues is None else delete_queues
            self._stop_consuming(watch, set(watch.consumers))
            if delete:
                self._delete_queues(job_id, set(watch.job.queues))
            self._retire(watch)
            watch.done.set()
            return watch.job.ttl

        ttl = self._loop.call(disconnect)  # the watched job knows its real TTL, even for a bare id
        log_event(logger, logging.INFO, "job_disconnected", job_id=job_id)
        self._registry.write(job_id, ttl, {"queues_last_in_use": time.time()})

    def wait(self, job: Job | uuid.UUID | str, timeout: float | None = None) -> JobResult:
        """Block until the job's result has been delivered (and its queues cleaned up).

        Returns ERROR results too: call ``result.raise_for_status()`` to turn them into
        exceptions. Raises :class:`CallbackError` if one of your callbacks raised,
        ``TimeoutError`` after ``timeout`` seconds (the job goes on running).
        """
        if self._loop.on_loop_thread:
            raise RuntimeError("wait() cannot be called from a callback: it would block the client")
        job_id = job.id if isinstance(job, Job) else contract.parse_job_id(job)
        with self._lock:
            watch = self._watches.get(job_id) or self._finished.get(job_id)
        if watch is None:
            raise ValueError(
                f"job {job_id} is not known to this client; submit it or connect_to_submitted_job first"
            )
        if not watch.done.wait(timeout):
            raise TimeoutError(
                f"job {job_id} has no result after {timeout} s; it is still running, call wait() again"
            )
        if watch.error is not None:
            raise watch.error
        if watch.result is None:
            raise ClientClosedError(
                f"job {job_id} was disconnected before its result arrived; its queues wait for "
                "connect_to_submitted_job until their TTL runs out"
            )
        return watch.result

    def close(self) -> None:
        """Close the connection. Jobs still running keep their queues until their TTL runs out."""
        self._loop.stop()
        with self._lock:
            open_watches = list(self._watches.values())
        for watch in open_watches:  # their TTL clock starts now
            self._registry.write(watch.job.id, watch.job.ttl, {"queues_last_in_use": time.time()})
            if not watch.done.is_set():
                watch.error = ClientClosedError(
                    f"job {watch.job.id}: the client was closed before the result arrived; the "
                    "queues keep what arrives until their TTL runs out: connect_to_submitted_job"
                )
                watch.done.set()
        with contextlib.suppress(Exception):  # already broken: nothing left to release
            self._loop_connection().release()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- on the loop thread --------------------------------------------------------------

    def _submit_on_loop(self, watch: _Watch, request: contract.TaskRequest) -> None:
        job = watch.job
        try:
            for kind in sorted(job.queues):
                contract.job_queue(job.id, kind, job.ttl).queue_declare(
                    nowait=True, channel=self._publish_channel
                )
            # Confirmed publish: when it returns, the declares before it on this channel are done.
            self._celery.send_task(
                contract.TASK_NAME,
                args=[request.to_dict()],
                task_id=str(job.id),
                producer=self._producer,
                queue=self._task_queue,
                retry=False,
                argsrepr=repr((job.workflow, str(job.id))),
                kwargsrepr="{}",
                # The task queue belongs to the workers: callers never declare it (and need no
                # permission to), and a task with no queue to go to comes back instead of vanishing.
                declare=[],
                mandatory=True,
            )
        except Exception:
            self._reopen_publish_channel()
            raise
        if self._returned.pop(self.settings.task_queue, None):
            self._delete_queues(job.id, set(job.queues))
            raise BrokerUnavailableError(
                f"task queue {self.settings.task_queue!r} does not exist, so job {job.id} was not "
                "submitted: start a worker (celery -A tasks worker) or check EBB_TASK_QUEUE"
            )
        self._consume(watch, job.queues)

    def _consume(self, watch: _Watch, kinds: set[QueueKind] | frozenset[QueueKind]) -> None:
        job_id = watch.job.id
        for kind in sorted(kinds):
            self._tags += 1
            tag = f"ebb.{self._tags}"

            def on_message(message: Message, _watch: _Watch = watch, _kind: QueueKind = kind) -> None:
                self._inbox.append((_watch, _kind, message))

            self._consume_channel.basic_consume(
                queue=contract.queue_name(job_id, kind),
                consumer_tag=tag,
                callback=on_message,
                nowait=True,
            )
            watch.consumers[kind] = tag
        watch.kinds = frozenset(kinds)
        with self._lock:
            self._watches[job_id] = watch
            self._finished.pop(job_id, None)

    def _probe_queues(
        self, job_id: uuid.UUID, kinds: set[QueueKind], connection: Connection | None = None
    ) -> set[QueueKind]:
        """Which of the job's queues exist, asked on a channel of its own (a 404 closes it)."""
        present: set[QueueKind] = set()
        for kind in sorted(kinds):
            if self._probe_channel is None:
                self._probe_channel = (connection or self._loop_connection()).channel()
            try:
                self._probe_channel.queue_declare(contract.queue_name(job_id, kind), passive=True)
            except NotFound:
                self._probe_channel = None
                if kind is QueueKind.RESULT:
                    return present
            else:
                present.add(kind)
        return present

    def _stop_consuming(self, watch: _Watch, kinds: set[QueueKind]) -> None:
        for kind in kinds:
            tag = watch.consumers.pop(kind, None)
            if tag is not None:
                self._consume_channel.basic_cancel(tag, nowait=True)

    def _delete_queues(self, job_id: uuid.UUID, kinds: set[QueueKind]) -> None:
        names = [contract.queue_name(job_id, k) for k in sorted(kinds)]
        for i, name in enumerate(names):
            # The last delete waits for its reply, so all of them are done when this returns.
            self._publish_channel.queue_delete(name, nowait=i < len(names) - 1)
            log_event(logger, logging.DEBUG, "queue_deleted", job_id=job_id, queue=name)
        self._cleanup_pending.pop(job_id, None)

    def _make_producer(self) -> Producer:
        return Producer(
            self._publish_channel, serializer="json", auto_declare=False, on_return=self._on_return
        )

    def _on_return(self, exception: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """A mandatory publish the broker could not route: noted, and raised by the publisher."""
        self._returned[routing_key] = True

    def _loop_connection(self) -> Connection:
        connection = self._loop.connection
        assert connection is not None
        return connection

    def _reopen_publish_channel(self) -> None:
        with contextlib.suppress(Exception):
            self._publish_channel.close()
        if self._loop_connection().connected:
            self._publish_channel = self._loop_connection().channel()
            self._producer = self._make_producer()

    def _ack(self, message: Message, *, requeue: bool = False) -> None:
        """Settle a delivery on the channel it came on; after a reconnect it is redelivered anyway."""
        channel = message.channel
        if channel is not self._consume_channel or not channel.is_open:
            return
        tag = message.delivery_info["delivery_tag"]
        if requeue:
            channel.basic_reject(tag, requeue=True)
        else:
            channel.basic_ack(tag)

    def _retire(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.pop(watch.job.id, None)
            self._finished[watch.job.id] = watch
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)

    def _after_io(self) -> None:
        while self._inbox:
            watch, kind, message = self._inbox.popleft()
            self._handle(watch, kind, message)
        self._flush_stragglers()

    def _handle(self, watch: _Watch, kind: QueueKind, message: Message) -> None:
        job_id = watch.job.id
        queue = contract.queue_name(job_id, kind)
        try:
            payload = contract.decode(kind, message.body, message.content_type)
            if payload.job_id != job_id:
                raise contract.MalformedMessageError(f"message is for job {payload.job_id}")
        except contract.MalformedMessageError as exc:
            log_event(logger, logging.ERROR, "message_malformed", job_id=job_id, queue=queue, error=exc)
            self._ack(message)
            return
        if isinstance(payload, JobResult):
            if watch.pending is None and watch.result is None:
                watch.pending = (payload, message)
                watch.pending_since = time.monotonic()
                self._maybe_finish(watch)
            else:  # a duplicate (redelivery, or a re-run job): the first one is what counts
                self._ack(message)
            return
        if payload.attempt > watch.attempt:  # the job was restarted: its numbering starts again
            watch.attempt = payload.attempt
            watch.last_seq.clear()
        elif payload.attempt < watch.attempt or payload.seq <= watch.last_seq.get(kind, 0):
            self._ack(message)  # from an earlier attempt, or delivered before: not again
            return
        watch.last_seq[kind] = payload.seq
        if isinstance(payload, ProgressUpdate):
            failed = self._run_callback(watch, "on_progress", watch.on_progress, payload)
        else:
            failed = self._run_callback(watch, "on_status", watch.on_status, payload)
        if failed is not None and watch.error is None:
            watch.error = CallbackError(
                job_id, "on_progress" if kind is QueueKind.PROGRESS else "on_status", None
            )
            watch.error.__cause__ = failed
        self._ack(message)
        if watch.pending is not None:
            self._maybe_finish(watch)

    def _run_callback(self, watch: _Watch, name: str, callback: Any, payload: Any) -> Exception | None:
        if callback is None:
            return None
        try:
            callback(watch.job, payload)
        except Exception as exc:
            log_event(
                logger,
                logging.ERROR,
                "callback_failed",
                job_id=watch.job.id,
                callback=name,
                error=repr(exc),
            )
            return exc
        return None

    def _maybe_finish(self, watch: _Watch, *, force: bool = False) -> None:
        assert watch.pending is not None
        result, message = watch.pending
        behind = [
            kind
            for kind in watch.consumers
            if kind is not QueueKind.RESULT
            and result.attempt == watch.attempt
            and watch.last_seq.get(kind, 0) < result.last_seq.get(kind, 0)
        ]
        if behind and not force:
            return
        if behind:
            log_event(
                logger,
                logging.WARNING,
                "messages_missing",
                job_id=watch.job.id,
                queues=",".join(k.value for k in behind),
                detail=f"result delivered after waiting {STRAGGLER_GRACE}s for them",
            )
        watch.pending = None
        job_id = watch.job.id
        failed = self._run_callback(watch, "on_finished", watch.on_finished, result)
        if failed is not None:
            # Keep the result: back into its queue, nobody consuming, so its TTL starts.
            watch.error = CallbackError(job_id, "on_finished", result)
            watch.error.__cause__ = failed
            self._stop_consuming(watch, set(watch.consumers))
            self._ack(message, requeue=True)
            self._registry.write(job_id, watch.job.ttl, {"queues_last_in_use": time.time()})
            watch.result = result
            self._retire(watch)
            watch.done.set()
            log_event(
                logger,
                logging.WARNING,
                "result_requeued",
                job_id=job_id,
                queue=contract.queue_name(job_id, QueueKind.RESULT),
            )
            return
        kinds = set(watch.job.queues) if watch.auto_disconnect else {QueueKind.RESULT}
        self._cleanup_pending[job_id] = kinds  # done again after a reconnect if cut off here
        self._ack(message)
        self._stop_consuming(watch, kinds)
        self._delete_queues(job_id, kinds)
        now = time.time()
        self._registry.write(
            job_id,
            watch.job.ttl,
            {
                "status": result.status.value,
                "result_delivered": True,
                "result_delivered_at": now,
                "queues_last_in_use": now,
            },
        )
        if isinstance(watch.error, CallbackError):
            watch.error.result = result
        watch.result = result
        if watch.auto_disconnect:
            self._retire(watch)
        watch.done.set()
        log_event(logger, logging.INFO, "job_finished", job_id=job_id, status=result.status.value)

    def _flush_stragglers(self) -> None:
        now = time.monotonic()
        for watch in list(self._watches.values()):
            if watch.pending is not None and now - watch.pending_since > STRAGGLER_GRACE:
                self._maybe_finish(watch, force=True)

    def _on_connection_lost(self, exc: BaseException) -> None:
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            if not watch.done.is_set():
                watch.error = ClientClosedError(
                    f"job {watch.job.id}: the client lost its broker connection ({exc!r}); the job's "
                    "queues keep what arrives until their TTL runs out: reconnect with a new "
                    "JobClient and connect_to_submitted_job"
                )
                watch.done.set()


def _sender_app(settings: Settings) -> Celery:
    """A Celery app used only to format and send task messages (no worker code, no backend)."""
    app = Celery("ebb-sdk", set_as_current=False, broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_send_sent_event=True,
        task_default_queue=settings.task_queue,
        task_ignore_result=True,
    )
    return app


def _safe_url(url: str) -> str:
    """The broker URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _timeout_seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise TypeError(f"job_timeout must be a timedelta or a number of seconds, not {type(value).__name__}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"job_timeout={value!r} must be a positive, finite duration")
    return seconds
