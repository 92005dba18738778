"""``AsyncJobClient``: the same jobs from asyncio, on the same job core as ``JobClient``.

The policy (dedupe, stragglers, raising callbacks, when queues go) is ``ebb.core``'s, exactly as
in the sync client; this module is only the asyncio transport, over aiormq (the AMQP client
aio-pika is built on): one connection per client, no thread and no task per job. A delivery
only feeds the job's tracker; a callback runs in a short task of its own (plain functions in
asyncio's default executor), so a slow or raising callback never holds up other jobs'
deliveries or the heartbeat. Every wait on the broker is bounded by ``EBB_BROKER_TIMEOUT``, and
a connection silent for a heartbeat interval and a second (aiormq's own test, within two intervals as
in the sync client) is closed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, cast

import aiormq
import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ebb import checks, contract, core, links
from ebb.acks import AckBatch
from ebb.broker_replies import (
    PROBE_BATCH,
    Present,
    Probe,
    Unreachable,
    job_queues_present,
    probe_bound,
    queue_unreachable,
    task_not_taken,
)
from ebb.celery_wire import EVENT_EXCHANGE, EVENT_ROUTING_KEY, TaskMessages
from ebb.config import Settings
from ebb.contract import JobResult, ProgressUpdate, QueueKind, StatusUpdate
from ebb.errors import (
    BrokerUnavailableError,
    ClientClosedError,
    EbbError,
    InvalidArgumentError,
    JobQueuesExpiredError,
    JobQueuesUnavailableError,
    QueueUnavailableError,
    RegistryUnavailableError,
    UnknownJobError,
    WaitTimeoutError,
)
from ebb.job import Job
from ebb.logfmt import log_event
from ebb.records import NOT_SUBMITTED, SUBMITTED, JobRecord
from ebb.redact import redact
from ebb.registry import Registry
from ebb.unsettled import UnsettledTasks, unconfirmed_task
from ebb.workers import WorkflowCatalog, WorkflowInfo

logger = logging.getLogger("ebb.client")

Callback = Callable[[Job, Any], Any]
Event = StatusUpdate | ProgressUpdate | JobResult
#: What the broker library raises when a connection or channel fails.
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


@dataclass(eq=False)
class _Watch:
    job: Job
    tracker: core.JobTracker[DeliveredMessage]
    callbacks: dict[core.Callback, Callback]
    record_ttl: timedelta | None
    consumers: dict[QueueKind, str] = field(default_factory=dict)
    result: JobResult | None = None
    error: EbbError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: What arrived for ``events()``: kept only for a job without callbacks.
    events: deque[Event] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: When ``wait()`` last asked the registry whether the result was lost (``core.LOST_CHECK_EVERY``).
    lost_checked_at: float = field(default_factory=time.monotonic)


class _WriteBatch:
    """Registry writes awaited by many coroutines at once, as one pipelined write in a thread.

    A burst of 1,000 submits then costs a few Redis round trips and thread hops, not 1,000; a
    lone submit waits one loop turn longer. One batch at a time, so a job's writes keep their order.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._pending: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]] = {}
        self._waiters: list[asyncio.Future[bool]] = []
        self._runner: asyncio.Task[None] | None = None

    async def write(self, job_id: uuid.UUID, ttl: timedelta, fields: dict[str, Any]) -> bool:
        """``Registry.write``, batched: False when Redis could not be written."""
        return await self.write_many({job_id: (ttl, fields)})

    async def write_many(self, updates: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]]) -> bool:
        """``Registry.write_many``, batched with every other write of this loop turn."""
        for job_id, (ttl, fields) in updates.items():
            self._pending.setdefault(job_id, (ttl, {}))[1].update(fields)
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        return await waiter

    async def _run(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)  # the rest of this turn's writes join the batch
                pending, self._pending = self._pending, {}
                waiters, self._waiters = self._waiters, []
                ok = await asyncio.to_thread(self._registry.write_many, pending)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(ok)
        finally:
            self._runner = None


class AsyncJobClient:
    """A caller's connection to Ebb from asyncio: same settings, errors and behaviour as JobClient."""

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None) -> None:
        base = settings or Settings.from_env()
        if broker_url is not None:
            base = dataclasses.replace(base, broker_url=broker_url)
        self.settings = base
        self._registry = Registry(base)
        self._writes = _WriteBatch(self._registry)
        self._catalog = WorkflowCatalog(
            self._registry.client, base.task_queue, enabled=base.check_workflows, settings=base
        )
        self._messages = TaskMessages()
        self._watches: dict[uuid.UUID, _Watch] = {}
        self._finished = core.FinishedJobs(base.keep_results, base.keep_results_bytes)
        self._tags = itertools.count(1)
        #: Consumer tag -> (job, queue kind): whose consumer RabbitMQ cancelled.
        self._consumer_of: dict[str, tuple[_Watch, QueueKind]] = {}
        self._cancelled: list[tuple[_Watch, QueueKind]] = []
        self._cancel_runner: asyncio.Future[None] | None = None
        # One submit at a time on the wire (its declares, its task, the task's confirm: one round
        # trip). RabbitMQ's channel works harder per job with several outstanding: 1,000 at once
        # cost its channel process 27 % more reductions per job, two at once 10 % more, than
        # one at a time. A burst of submits still goes at one per round trip (~1 ms locally).
        self._submitting = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Queue deletes the connection cut off: done again after the reconnect.
        self._cleanup_pending: dict[uuid.UUID, frozenset[QueueKind]] = {}
        #: Tasks whose confirm never came, sent again after the next reconnect (ebb.unsettled).
        self._unsettled: UnsettledTasks[tuple[bytes, Basic.Properties]] = UnsettledTasks()
        self._connection: aiormq.Connection | None = None
        self._consume: aiormq.Channel
        self._publish: aiormq.abc.AbstractChannel
        self._events: aiormq.abc.AbstractChannel
        #: Probe channels that answered, kept for the next probes (as ``QueueProbes`` keeps them).
        self._probes: list[aiormq.abc.AbstractChannel] = []
        self._ready = asyncio.Event()
        # One burst of work (what the reader handed over before the loop idles) ends in one
        # flush: a multiple-ack, one pipelined registry write, then the waiters wake.
        self._acks = AckBatch()
        self._records: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]] = {}
        self._to_signal: list[_Watch] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._failure: BaseException | None = None
        self.reconnects = 0

    # --- connection ----------------------------------------------------------------------

    async def __aenter__(self) -> AsyncJobClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect; ``BrokerUnavailableError`` if RabbitMQ cannot be reached."""
        try:
            await self._connect()
        except AMQP_ERRORS as exc:
            raise links.broker_connect_error(exc, self.settings) from exc
        self._spawn(self._supervise())

    def _urls(self) -> list[str]:
        """EBB_BROKER_URL's brokers, in order, as aiormq takes them (``amqps`` stays TLS)."""
        return [links.aiormq_url(url, self.settings.heartbeat) for url in links.broker_urls(self.settings)]

    async def _connect(self) -> None:
        """The first broker of the failover list that answers (each tried within the bound)."""
        urls = self._urls()
        for n, url in enumerate(urls):
            try:
                await self._connect_to(url)
                return
            except AMQP_ERRORS as exc:
                if n == len(urls) - 1:
                    raise links.broker_connect_error(exc, self.settings, url) from exc
                log_event(
                    logger,
                    logging.WARNING,
                    "broker_failover",
                    broker=redact(url),
                    error=redact(repr(exc)),
                )

    async def _connect_to(self, url: str) -> None:
        async with asyncio.timeout(self.settings.broker_timeout):
            tls = links.tls_context(self.settings) if url.startswith("amqps:") else None
            connection = _Connection(url, context=tls)
            await connection.connect()
            self._consume = cast(aiormq.Channel, await _channel(connection, publisher_confirms=False))
            self._consume.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
            await self._consume.basic_qos(prefetch_count=0)
            self._publish = await _channel(connection, publisher_confirms=True, on_return_raises=True)
            # The task-sent events go unconfirmed (monitoring only, as Celery sends its events)
            # on a channel of their own: a refused one closes it, never the consumers' channel.
            self._events = await _channel(connection, publisher_confirms=False)
            await self._events.exchange_declare(EVENT_EXCHANGE, exchange_type="topic", durable=True)
        self._acks.clear()
        self._connection = connection
        self._probes = []
        self._ready.set()

    async def _supervise(self) -> None:
        """Watch the connection; when it dies (or goes silent), reconnect and resume every job."""
        while not self._closing:
            assert self._connection is not None
            await self._until_lost(self._connection)
            if self._closing:
                return
            self._ready.clear()
            log_event(logger, logging.WARNING, "connection_lost", action="reconnecting")
            for watch in list(self._watches.values()):
                watch.tracker.connection_lost()
                watch.consumers.clear()
            self._consumer_of.clear()
            self._cancelled.clear()  # the reconnect probes every job
            deadline = time.monotonic() + self.settings.reconnect_timeout
            delay = 0.25
            while not self._closing:
                try:
                    await self._connect()
                    await self._resume()
                    for job_id, kinds in list(self._cleanup_pending.items()):
                        await self._delete_queues(job_id, kinds)
                    await self._resend_unsettled()
                    break
                except Exception as exc:  # never let the reconnect die: the client would be stuck
                    if not isinstance(exc, AMQP_ERRORS):
                        log_event(
                            logger, logging.WARNING, "reconnect_attempt_failed", error=redact(repr(exc))
                        )
                    if time.monotonic() > deadline:
                        self._failure = exc
                        await self._fail_all(
                            ClientClosedError(
                                f"the client lost its broker connection for good: {redact(repr(exc))}"
                            )
                        )
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 3.0)
            self.reconnects += 1
            log_event(logger, logging.WARNING, "connection_restored", reconnects=self.reconnects)

    async def _until_lost(self, connection: aiormq.Connection) -> None:
        """Return once the connection closed, or went silent (aiormq's stuck test, see _connect).

        aiormq runs that test only every half heartbeat; this looks four times a second.
        """
        closing = connection.closing
        while not connection.is_closed and not self._closing and not closing.done():
            if connection.is_connection_was_stuck:
                limit = self.settings.heartbeat + 1
                log_event(logger, logging.WARNING, "connection_dead", detail=f"no frame for {limit:g} s")
                with contextlib.suppress(BaseException):
                    async with asyncio.timeout(1):
                        await connection.close(ConnectionError(f"no frame for {limit:g} s"))
                return
            await asyncio.wait({closing}, timeout=0.25)

    async def _resume(
        self, watches: list[_Watch] | None = None, vanished: str = core.VANISHED_WHILE_DISCONNECTED
    ) -> None:
        """Ask the broker which jobs' queues exist (all jobs after a reconnect), and go on."""
        resuming = watches or [
            watch
            for watch in list(self._watches.values())
            if not (watch.tracker.finished and watch.tracker.auto_disconnect)
        ]
        # Every job's queues at once, as JobClient does (a lost node's queue on RabbitMQ 4 takes
        # the probe's whole bound to go unanswered).
        probes = await self._probe({contract.queue_name(w.job.id, k) for w in resuming for k in w.job.queues})
        for watch in resuming:
            try:
                present = _job_queues(watch.job.id, set(watch.job.queues), probes)
            except JobQueuesUnavailableError as unreachable:  # down, not gone: wait() says so
                log_event(
                    logger,
                    logging.WARNING,
                    "job_queues_unreachable",
                    job_id=watch.job.id,
                    queue=unreachable.queue,
                    node=unreachable.node,
                )
                async with watch.lock:
                    await self._carry_out(watch, watch.tracker.abandon(unreachable))
                continue
            async with watch.lock:
                await self._carry_out(watch, watch.tracker.consume(frozenset(present), vanished))

    def _on_consumer_cancelled(self, frame: Basic.Cancel) -> None:
        """RabbitMQ cancelled a consumer (queue deleted, or its node down): as JobClient does,
        probe and go on. A node going down cancels many at once: one task probes them together
        (aiormq's reader runs this callback, so never here)."""
        found = self._consumer_of.pop(str(frame.consumer_tag), None)
        if found is None:
            return
        self._cancelled.append(found)
        if self._cancel_runner is None or self._cancel_runner.done():
            self._cancel_runner = self._spawn(self._after_cancels())

    async def _after_cancels(self) -> None:
        await asyncio.sleep(0.1)  # the rest of the burst joins this round
        while self._cancelled:
            cancelled, self._cancelled = self._cancelled, []
            probing: list[_Watch] = []
            for watch, kind in cancelled:
                watch.consumers.pop(kind, None)
                async with watch.lock:
                    current = self._watches.get(watch.job.id) is watch
                    actions = watch.tracker.consumer_cancelled(kind) if current else None
                    if actions is None:
                        continue
                    with contextlib.suppress(*AMQP_ERRORS, EbbError):
                        await self._carry_out(watch, actions)
                queue = contract.queue_name(watch.job.id, kind)
                log_event(logger, logging.WARNING, "consumer_cancelled", job_id=watch.job.id, queue=queue)
                if watch not in probing:
                    probing.append(watch)
            if probing:
                with contextlib.suppress(*AMQP_ERRORS, EbbError):  # broken: the reconnect resumes them
                    await self._resume(probing, core.CANCELLED_VANISHED)

    async def _fail_all(self, error: EbbError) -> None:
        for watch in list(self._watches.values()):
            await self._carry_out(watch, watch.tracker.abandon(error))

    async def _channel_ready(self) -> None:
        if self._failure is not None or self._closing:
            raise ClientClosedError("the client is closed")
        if not self._ready.is_set():
            raise BrokerUnavailableError("the broker connection is down; the client is reconnecting")

    # --- public API ----------------------------------------------------------------------

    async def submit_job(
        self,
        workflow: str,
        params: Mapping[str, Any] | None = None,
        *,
        on_finished: Callback | None = None,
        on_progress: Callback | None = None,
        on_status: Callback | None = None,
        auto_disconnect_on_result: bool = True,
        auto_cleanup_after_ttl: timedelta | float | None = None,
        reference: str | None = None,
        job_timeout: timedelta | float | None = None,
        updates: bool = False,
    ) -> Job:
        """As ``JobClient.submit_job``; callbacks may be plain or coroutine functions."""
        params_dict = checks.job_params(workflow, params, self.settings.max_params_bytes)
        ttl = checks.validate_ttl(
            auto_cleanup_after_ttl, default=self.settings.default_ttl, maximum=self.settings.max_ttl
        )
        timeout = checks.job_timeout_seconds(job_timeout)
        await self._channel_ready()
        if not self._catalog.knows(workflow):
            await asyncio.to_thread(self._catalog.check, workflow, self._consumers_from_thread)
        params_dict = self._catalog.params_for(workflow, params_dict)
        kinds = checks.wanted_queues(on_progress, on_status, updates=updates)
        job = Job(id=uuid.uuid4(), workflow=workflow, ttl=ttl, queues=kinds, reference=reference)
        watch = self._watch(job, ttl, auto_disconnect_on_result, on_finished, on_progress, on_status)
        request = contract.TaskRequest(
            job.id, workflow, params_dict, job.queues, ttl.total_seconds(), timeout
        )
        now = time.time()
        await self._writes.write(
            job.id,
            ttl,
            {
                "workflow": workflow,
                "reference": reference,
                "status": SUBMITTED,
                "submitted_at": now,
                "result_delivered": False,
                "queues_last_in_use": now,
            },
        )
        try:
            async with self._submitting:
                await self._send(watch, request)
        except BrokerUnavailableError as exc:
            if exc.job_id is None:
                await self._writes.write(job.id, ttl, {"status": NOT_SUBMITTED})
            raise
        log_event(logger, logging.INFO, "job_submitted", job_id=job.id, workflow=workflow, ttl=ttl)
        return job

    async def _send(self, watch: _Watch, request: contract.TaskRequest) -> None:
        job = watch.job
        message, sent_event = self._messages.task(request)
        task = (
            message.body.encode() if isinstance(message.body, str) else message.body,
            _properties(message),
        )
        bound = self.settings.broker_timeout
        try:
            await self._send_task(job, task)
        except aiormq.exceptions.DeliveryError as refused:
            await self._delete_queues(job.id, job.queues)
            # As JobClient: returned (no such queue, or RabbitMQ 3 and its node down) or nacked
            # (RabbitMQ 4 and its node down, or a refusal): a probe tells which.
            task_queue = self.settings.task_queue
            outcome = "nacked" if isinstance(refused.frame, Basic.Nack) else "returned"
            probe = (await self._probe({task_queue}))[task_queue]
            raise BrokerUnavailableError(task_not_taken(task_queue, job.id, outcome, probe)) from None
        except BrokerUnavailableError as lost:
            if lost.job_id is None:  # its queues were not declared: the task was certainly not sent
                raise
            self._unsettled.add(job, task, time.time())
            raise BrokerUnavailableError(
                unconfirmed_task(job.id, "connection lost", bound), job_id=job.id
            ) from lost
        except AMQP_ERRORS as exc:
            self._unsettled.add(job, task, time.time())
            raise BrokerUnavailableError(
                unconfirmed_task(job.id, redact(repr(exc)), bound), job_id=job.id
            ) from exc
        await self._announce(self._messages.sent_event(sent_event, self.settings.task_queue))
        self._watches[job.id] = watch
        self._finished.pop(job.id)
        async with watch.lock:
            await self._carry_out(watch, watch.tracker.consume(job.queues))

    async def _send_task(self, job: Job, task: tuple[bytes, Basic.Properties]) -> None:
        """The job's queue declares, then its task (mandatory, confirmed), each within the bound.

        ``BrokerUnavailableError`` without a job id: not sent; with one, or any other broker
        error from the publish: sent, perhaps, and never confirmed.
        """
        try:
            channel = await self._publish_channel()
        except AMQP_ERRORS as exc:
            raise _unavailable(exc, f"opening a channel for job {job.id}") from exc
        # nowait: the task's confirm below means these were done before it.
        await self._declare_queues(job, nowait=True, channel=channel)
        body, properties = task
        bound = self.settings.broker_timeout
        async with _broker_call(f"publishing job {job.id}", job.id), asyncio.timeout(bound):
            await channel.basic_publish(
                body, routing_key=self.settings.task_queue, properties=properties, mandatory=True
            )

    async def _declare_queues(
        self, job: Job, *, nowait: bool, channel: aiormq.abc.AbstractChannel | None = None
    ) -> None:
        """The job's queues, with the arguments they were submitted with (a no-op where they exist)."""
        try:
            channel = channel or await self._publish_channel()
            async with (
                _broker_call(f"declaring the queues of job {job.id}"),
                asyncio.timeout(self.settings.broker_timeout),
            ):
                for kind in sorted(job.queues):
                    name = contract.queue_name(job.id, kind)
                    arguments = contract.job_queue_arguments(job.ttl, self.settings.queue_type)
                    if nowait:
                        await channel.queue_declare(name, durable=True, arguments=arguments, nowait=True)
                    else:
                        await channel.queue_declare(name, durable=True, arguments=arguments)
        except AMQP_ERRORS as exc:
            raise _unavailable(exc, f"declaring the queues of job {job.id}") from exc

    async def _resend_unsettled(self) -> None:
        """After a reconnect: the tasks whose confirm never came, sent again (ebb.unsettled)."""
        for job, task in list(self._unsettled.due(time.time())):
            outcome: str | None = None
            try:
                await self._send_task(job, task)
            except aiormq.exceptions.DeliveryError as refused:
                outcome = "nacked" if isinstance(refused.frame, Basic.Nack) else "returned"
            except BrokerUnavailableError as exc:
                outcome = redact(repr(exc))
            except AMQP_ERRORS as exc:
                outcome = redact(repr(exc))
            for event, level, fields in self._unsettled.settled(job, outcome):
                log_event(logger, level, event, job_id=job.id, queue=self.settings.task_queue, **fields)

    async def _announce(self, event: Any) -> None:
        """The task-sent event, for Flower: unconfirmed, so nobody waits for the broker."""
        if self._events.is_closed:
            return
        with contextlib.suppress(*AMQP_ERRORS):
            async with asyncio.timeout(self.settings.broker_timeout):
                await self._events.basic_publish(
                    event.body.encode() if isinstance(event.body, str) else event.body,
                    exchange=EVENT_EXCHANGE,
                    routing_key=EVENT_ROUTING_KEY,
                    properties=_properties(event),
                )

    async def connect_to_submitted_job(
        self,
        job: Job | uuid.UUID | str,
        *,
        on_finished: Callback | None = None,
        on_progress: Callback | None = None,
        on_status: Callback | None = None,
        auto_disconnect_on_result: bool = True,
        auto_cleanup_after_ttl: timedelta | float | None = None,
    ) -> Job:
        """As ``JobClient.connect_to_submitted_job``: passive probes only, then what waited."""
        job_id, known = checks.reconnect_target(
            job,
            checks.wanted_queues(on_progress, on_status),
            auto_cleanup_after_ttl,
            default_ttl=self.settings.default_ttl,
            max_ttl=self.settings.max_ttl,
        )
        wanted = checks.wanted_queues(on_progress, on_status)
        if on_finished is None and on_progress is None and on_status is None:  # for events()
            wanted = known.queues if known is not None else frozenset(QueueKind)
        if job_id in self._watches:
            raise InvalidArgumentError(f"job {job_id} is already connected to this client")
        await self._channel_ready()
        record_ttl: timedelta | None
        if known is not None:
            handle, record_ttl = known, known.ttl
        else:
            handle, record_ttl = await asyncio.to_thread(
                self._registry.describe, job_id, self.settings.default_ttl
            )
        probe = wanted if known is not None else frozenset(QueueKind)
        unsent = self._unsettled.job(job_id)
        if unsent is not None:  # its task goes again after a reconnect: so do its queues
            await self._declare_queues(unsent, nowait=False)
        present = await self._probe_queues(job_id, set(probe))
        if QueueKind.RESULT not in present:
            raise JobQueuesExpiredError(job_id, await asyncio.to_thread(self._registry.story, job_id))
        watch = self._watch(
            handle, record_ttl, auto_disconnect_on_result, on_finished, on_progress, on_status
        )
        self._watches[job_id] = watch
        self._finished.pop(job_id)
        try:
            async with watch.lock:
                await self._carry_out(watch, watch.tracker.consume(frozenset(present)))
        except BrokerUnavailableError as exc:
            # Connected all the same: the reconnect resumes the job with the others (a caller
            # who tried again was told "already connected", chaos run).
            log_event(logger, logging.WARNING, "job_connected_before_a_reconnect", job_id=job_id, error=exc)
        if record_ttl is not None:
            await asyncio.to_thread(
                self._registry.write, job_id, record_ttl, {"queues_last_in_use": time.time()}
            )
        log_event(logger, logging.INFO, "job_connected", job_id=job_id)
        return handle

    async def disconnect_from_submitted_job(
        self, job: Job | uuid.UUID | str, *, delete_queues: bool | None = None
    ) -> None:
        """As ``JobClient.disconnect_from_submitted_job``."""
        job_id = _job_id(job)
        watch = self._watches.get(job_id)
        if watch is None:
            raise InvalidArgumentError(f"job {job_id} is not connected to this client")
        async with watch.lock:
            await self._carry_out(watch, watch.tracker.disconnect(delete_queues, time.time()))
        log_event(logger, logging.INFO, "job_disconnected", job_id=job_id)

    async def wait(self, job: Job | uuid.UUID | str, timeout: float | None = None) -> JobResult:
        """As ``JobClient.wait``. Cancelling it (or a timeout around it) never loses the job."""
        watch = self._known(_job_id(job))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not watch.done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(
                    core.until_lost_check(watch.lost_checked_at, deadline, time.monotonic())
                ):
                    await watch.done.wait()
            if not watch.done.is_set():
                await self._check_lost(watch)
            if not watch.done.is_set() and deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"job {watch.job.id} has no result after {timeout} s; it is still running, "
                    "call wait() again"
                )
        if watch.error is not None:
            raise watch.error
        if watch.result is None:
            raise ClientClosedError(f"job {watch.job.id} ended without a result")
        return watch.result

    async def _check_lost(self, watch: _Watch) -> None:
        """As ``JobClient._check_lost``: the registry's word on a result the worker gave up on."""
        if time.monotonic() - watch.lost_checked_at < core.LOST_CHECK_EVERY:
            return
        watch.lost_checked_at = time.monotonic()
        try:
            record = await asyncio.to_thread(self._registry.get, watch.job.id)
        except RegistryUnavailableError:
            return
        if record is None or not record.lost:
            return
        lost = watch.tracker.result_lost(record.status, record.lost, record.result_delivered, time.time())
        with contextlib.suppress(EbbError):  # no broker now: the deletes wait for the reconnect
            await self._carry_out(watch, lost)

    async def events(self, job: Job | uuid.UUID | str) -> AsyncIterator[Event]:
        """Status and progress updates, then the result; what waited in the queues comes first."""
        watch = self._known(_job_id(job))
        if watch.events is None:
            raise InvalidArgumentError(
                f"job {watch.job.id} was submitted or connected with callbacks; events() reads a job "
                "without them"
            )
        while True:
            while watch.events:
                event = watch.events.popleft()
                yield event
                if isinstance(event, JobResult):
                    await watch.done.wait()  # its queues are deleted (or kept) by then, as for wait()
                    return
            if watch.done.is_set():
                if watch.error is not None:
                    raise watch.error
                return
            watch.arrived.clear()
            await watch.arrived.wait()  # set by every delivery and by the finish

    async def cancel_job(self, job: Job | uuid.UUID | str) -> None:
        """As ``JobClient.cancel_job``."""
        job_id = _job_id(job)
        record = await asyncio.to_thread(self._registry.get, job_id)
        if record is None:
            raise UnknownJobError(job_id)
        if record.ttl is None or not await asyncio.to_thread(
            self._registry.write, job_id, record.ttl, {"cancel_requested_at": time.time()}
        ):
            raise RegistryUnavailableError(f"could not record the cancellation of job {job_id} in Redis")
        log_event(logger, logging.INFO, "job_cancel_requested", job_id=job_id, status=record.status)

    async def job_status(self, job: Job | uuid.UUID | str) -> JobRecord:
        """As ``JobClient.job_status``: Redis only, never renews a queue's TTL."""
        job_id = _job_id(job)
        record = await asyncio.to_thread(self._registry.get, job_id)
        if record is None:
            raise UnknownJobError(job_id)
        return record

    async def list_workflows(self) -> list[WorkflowInfo]:
        return await asyncio.to_thread(self._catalog.list)

    async def close(self) -> None:
        """Close the connection; unfinished jobs keep their queues until their TTL runs out."""
        self._closing = True
        now = time.time()
        for watch in list(self._watches.values()):
            if watch.record_ttl is not None:
                await asyncio.to_thread(
                    self._registry.write, watch.job.id, watch.record_ttl, {"queues_last_in_use": now}
                )
            await self._carry_out(
                watch,
                watch.tracker.abandon(
                    ClientClosedError(
                        f"job {watch.job.id}: the client was closed before the result arrived; the "
                        "queues keep what arrives until their TTL runs out: connect_to_submitted_job"
                    )
                ),
            )
        if self._flusher is not None:  # the last records and wake-ups, before the connection goes
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(self.settings.broker_timeout):
                    await asyncio.shield(self._flusher)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._connection is not None:
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(5):
                    await self._connection.close()

    # --- helpers -------------------------------------------------------------------------

    def _known(self, job_id: uuid.UUID) -> _Watch:
        watch = self._watches.get(job_id) or self._finished.get(job_id)
        if watch is None:
            raise InvalidArgumentError(
                f"job {job_id} is not known to this client; submit it or connect_to_submitted_job "
                "first (outcomes of finished jobs are kept for the last EBB_KEEP_RESULTS jobs)"
            )
        assert isinstance(watch, _Watch)
        return watch

    def _watch(
        self,
        job: Job,
        record_ttl: timedelta | None,
        auto_disconnect: bool,
        on_finished: Callback | None,
        on_progress: Callback | None,
        on_status: Callback | None,
    ) -> _Watch:
        callbacks = core.callbacks_by_name(on_finished, on_progress, on_status)
        watch = _Watch(job, core.JobTracker(job, auto_disconnect=auto_disconnect), callbacks, record_ttl)
        if not callbacks:
            watch.events = deque()
        return watch

    def _consumers_from_thread(self) -> int:
        loop = self._loop
        return asyncio.run_coroutine_threadsafe(self._task_queue_consumers(), loop).result(
            self.settings.broker_timeout + 1
        )

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self._connection is not None
        return self._connection.loop

    async def _task_queue_consumers(self) -> int:
        queue = self.settings.task_queue
        found = (await self._probe({queue}))[queue]
        if isinstance(found, Unreachable):
            raise QueueUnavailableError(queue, found.node)
        return found.consumers if isinstance(found, Present) else 0

    async def _probe(self, names: set[str]) -> dict[str, Probe]:
        """As ``JobClient._probe``: passive declares, all at once, each on a channel of its own;
        one unanswered within ``probe_bound`` is out of reach if the broker opens a channel then."""
        bound = probe_bound(self.settings.broker_timeout)
        ordered = sorted(names)
        found: dict[str, Probe] = {}
        for start in range(0, len(ordered), PROBE_BATCH):
            batch = ordered[start : start + PROBE_BATCH]
            results = await asyncio.gather(
                *(self._probe_one(n, bound) for n in batch), return_exceptions=True
            )
            answers: list[tuple[bool, Probe]] = []
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                answers.append(result)
            if not all(answered for answered, _ in answers):  # the broker answers this, or fails
                self._keep_probe(await self._probe_channel())
            found |= {name: probe for name, (_, probe) in zip(batch, answers, strict=True)}
        return found

    async def _probe_one(self, name: str, bound: float) -> tuple[bool, Probe]:
        """One passive declare and whether it was answered within ``bound``: if not, the queue is
        out of reach (once the broker opens a channel), and the declare runs out in the background
        on its channel (``_abandoned``), which is never used again."""
        channel = await self._probe_channel()
        declare = asyncio.ensure_future(channel.queue_declare(name, passive=True))
        try:
            await asyncio.wait({declare}, timeout=bound)
        finally:  # not answered in time (or our caller was cancelled)
            if not declare.done():
                self._spawn(_abandoned(declare, channel))
        if not declare.done():
            return False, Unreachable(None)
        try:
            async with _broker_call(f"a passive declare of {name}"):
                ok = declare.result()
        except aiormq.exceptions.ChannelNotFoundEntity as exc:  # a 404 closed the channel
            return True, queue_unreachable(str(exc))
        except AMQP_ERRORS as exc:
            raise _unavailable(exc, f"a passive declare of {name}") from exc
        self._keep_probe(channel)
        return True, Present(int(ok.message_count or 0), int(ok.consumer_count or 0))

    async def _probe_channel(self) -> aiormq.abc.AbstractChannel:
        while self._probes:
            channel = self._probes.pop()
            if not channel.is_closed:
                return channel
        assert self._connection is not None
        try:
            async with _broker_call("opening a channel"), asyncio.timeout(self.settings.broker_timeout):
                return await _channel(self._connection, publisher_confirms=False)
        except AMQP_ERRORS as exc:
            raise _unavailable(exc, "opening a channel for a passive declare") from exc

    def _keep_probe(self, channel: aiormq.abc.AbstractChannel) -> None:
        if len(self._probes) < _IDLE_PROBES:
            self._probes.append(channel)
        else:
            self._spawn(_close_quietly(channel, self.settings.broker_timeout))

    async def _probe_queues(self, job_id: uuid.UUID, kinds: set[QueueKind]) -> set[QueueKind]:
        """As ``JobClient._probe_queues``: ``JobQueuesUnavailableError`` for a node that is down."""
        return _job_queues(job_id, kinds, await self._probe({contract.queue_name(job_id, k) for k in kinds}))

    async def _delete_queues(self, job_id: uuid.UUID, kinds: frozenset[QueueKind]) -> None:
        """Delete them; when the connection breaks first, again after the reconnect (as JobClient)."""
        self._cleanup_pending[job_id] = kinds
        names = [contract.queue_name(job_id, k) for k in sorted(kinds)]
        with contextlib.suppress(BrokerUnavailableError, *AMQP_ERRORS):
            channel = await self._publish_channel()
            async with _broker_call("deleting queues"), asyncio.timeout(self.settings.broker_timeout):
                for name in names[:-1]:
                    await channel.queue_delete(name, nowait=True)
                if names:  # the last one waits, so all are gone when this returns
                    await channel.queue_delete(names[-1])
            self._cleanup_pending.pop(job_id, None)

    async def _publish_channel(self) -> aiormq.abc.AbstractChannel:
        """The confirming channel; reopened if a failed call closed it (aiormq closes a channel
        whose call was cancelled or timed out)."""
        if self._publish.is_closed and self._connection is not None and not self._connection.is_closed:
            self._publish = await _channel(self._connection, publisher_confirms=True, on_return_raises=True)
        return self._publish

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_message(self, watch: _Watch, kind: QueueKind, message: DeliveredMessage) -> None:
        if self._watches.get(watch.job.id) is not watch:
            await self._reject(message)
            return
        if message.channel is self._consume and isinstance(message.delivery, Basic.Deliver):
            assert message.delivery.delivery_tag is not None
            self._acks.delivered(message.delivery.delivery_tag)
        content_type = message.header.properties.content_type
        async with watch.lock:
            actions = watch.tracker.received(kind, message.body, content_type, message, time.time())
            # Not inline: aiormq cancels its delivery tasks when the channel closes, and a
            # callback must run to its end once it started (the redelivery is a duplicate then).
            await self._carry_out(watch, actions)

    async def _carry_out(
        self, watch: _Watch, actions: list[core.Action], *, inline: bool = False
    ) -> core.Deliver | None:
        """Do what the tracker decided. A Deliver (one at a time per job) runs in a task of its
        own, or is returned when ``inline``: ``_deliver``, already in one, runs it next."""
        deliver: core.Deliver | None = None
        for action in actions:
            if isinstance(action, core.Deliver):
                if inline:
                    deliver = action
                else:
                    self._spawn(self._deliver(watch, action))
            elif isinstance(action, core.Ack):
                self._ack(action.token)
            elif isinstance(action, core.Requeue):
                await self._reject(action.token)
            elif isinstance(action, core.Consume):
                await self._start_consuming(watch, action.kinds)
            elif isinstance(action, core.StopConsuming):
                for kind in action.kinds:
                    tag = watch.consumers.pop(kind, None)
                    if tag is not None:
                        self._consumer_of.pop(tag, None)
                        with contextlib.suppress(*AMQP_ERRORS):
                            await self._consume.basic_cancel(tag, nowait=True)
            elif isinstance(action, core.DeleteQueues):
                for kind in action.kinds:
                    self._consumer_of.pop(watch.consumers.pop(kind, ""), None)
                await self._delete_queues(watch.job.id, action.kinds)
            elif isinstance(action, core.Record):
                if watch.record_ttl is not None:  # batched: one Redis round trip per burst
                    self._records.setdefault(watch.job.id, (watch.record_ttl, {}))[1].update(action.fields)
                    self._schedule_flush()
            elif isinstance(action, core.WakeAt):
                self._spawn(self._wake(watch, action.at))
            elif isinstance(action, core.Finish):
                self._finish(watch, action)
        return deliver

    async def _deliver(self, watch: _Watch, action: core.Deliver) -> None:
        """Run the callback (plain functions in a thread), report back, and go on with the next
        Deliver the tracker hands out. Runs in a task of its own: a slow callback holds up no
        other job and not the connection."""
        deliver: core.Deliver | None = action
        while deliver is not None:
            error: Exception | None = None
            if watch.events is not None:
                watch.events.append(deliver.payload)
                watch.arrived.set()
            callback = watch.callbacks.get(deliver.callback)
            if callback is not None:
                try:
                    if inspect.iscoroutinefunction(callback):
                        await callback(watch.job, deliver.payload)
                    else:
                        await asyncio.to_thread(callback, watch.job, deliver.payload)
                except Exception as exc:
                    error = exc
            async with watch.lock:
                deliver = await self._carry_out(
                    watch, watch.tracker.delivered(error, time.time()), inline=True
                )

    async def _wake(self, watch: _Watch, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        async with watch.lock:
            await self._carry_out(watch, watch.tracker.tick(time.time()))

    def _finish(self, watch: _Watch, action: core.Finish) -> None:
        if action.result is not None:
            self._unsettled.discard(watch.job.id)
        watch.result, watch.error = action.result, action.error
        if action.retire:
            if self._watches.get(watch.job.id) is watch:
                del self._watches[watch.job.id]
            self._finished.add(watch.job.id, watch, action.size)
            watch.callbacks = {}
            for tag in watch.consumers.values():
                self._consumer_of.pop(tag, None)
        self._to_signal.append(watch)  # once its registry record is written: see _flush
        self._schedule_flush()

    def _ack(self, message: DeliveredMessage) -> None:
        """Batched: sent with the burst's flush, on the channel the delivery came on."""
        if message.channel is self._consume and isinstance(message.delivery, Basic.Deliver):
            assert message.delivery.delivery_tag is not None
            self._acks.ack(message.delivery.delivery_tag)
            self._schedule_flush()

    async def _reject(self, message: DeliveredMessage) -> None:
        """Requeue at once; after a reconnect the delivery comes again anyway."""
        channel = message.channel
        if channel.is_closed or not isinstance(message.delivery, Basic.Deliver):
            return
        tag = message.delivery.delivery_tag
        assert tag is not None
        if channel is self._consume:
            self._acks.settled_otherwise(tag)
        with contextlib.suppress(*AMQP_ERRORS):
            await channel.basic_reject(tag, requeue=True)

    def _schedule_flush(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _burst_settled(self) -> None:
        """Yield until a whole turn of the loop added nothing to flush: the burst is over.

        A delivery's ack comes a few turns after it (its callback runs in a task of its own),
        so one turn is not enough to collect a burst; RabbitMQ pays per ack frame.
        """
        size = -1
        while size != (size := self._acks.pending + len(self._records) + len(self._to_signal)):
            await asyncio.sleep(0)

    async def _flush(self) -> None:
        """End of a burst: the acks, then the registry writes, then wake whoever waits on a job.

        In that order, so that ``wait()`` returns only once the record says the result was
        delivered, and a burst of 1,000 results costs one Redis round trip, not 1,000. One
        flush at a time, so the writes for one job land in the order they were made.
        """
        try:
            while True:
                await self._burst_settled()
                plan = self._acks.take()
                records, self._records = self._records, {}
                signal, self._to_signal = self._to_signal, []
                if plan is None and not records and not signal:
                    return
                if plan is not None and not self._consume.is_closed:
                    with contextlib.suppress(*AMQP_ERRORS):
                        if plan.multiple_up_to is not None:
                            await self._consume.basic_ack(plan.multiple_up_to, multiple=True)
                        for tag in plan.singles:
                            await self._consume.basic_ack(tag)
                if records:
                    await self._writes.write_many(records)
                for watch in signal:
                    watch.done.set()
                    watch.arrived.set()
        finally:
            self._flusher = None

    async def _start_consuming(self, watch: _Watch, kinds: frozenset[QueueKind]) -> None:
        for kind in sorted(kinds):
            tag = f"ebb.{next(self._tags)}"

            async def on_message(message: DeliveredMessage, _kind: QueueKind = kind) -> None:
                await self._on_message(watch, _kind, message)

            try:
                # nowait (aiormq's basic_consume always waits): register the consumer, then send.
                self._consume.consumers[tag] = on_message
                async with _broker_call("consuming"), asyncio.timeout(self.settings.broker_timeout):
                    await self._consume.rpc(
                        Basic.Consume(
                            queue=contract.queue_name(watch.job.id, kind), consumer_tag=tag, nowait=True
                        )
                    )
            except AMQP_ERRORS as exc:
                raise _unavailable(exc, f"consuming the queues of job {watch.job.id}") from exc
            watch.consumers[kind] = tag
            self._consumer_of[tag] = (watch, kind)


class _Connection(aiormq.Connection):
    """aiormq's connection with its own test of a silent connection ("stuck": no frame for
    (heartbeat + 1) s times this) at one: a heartbeat interval and a second, in which RabbitMQ
    sends two heartbeats. aiormq then stops reading, and the connection closes."""

    HEARTBEAT_GRACE_MULTIPLIER = 1


#: Probe channels kept open between probes (as ``QueueProbes.IDLE``).
_IDLE_PROBES = 4


def _job_queues(job_id: uuid.UUID, kinds: set[QueueKind], probes: dict[str, Probe]) -> set[QueueKind]:
    return job_queues_present(job_id, {k: probes[contract.queue_name(job_id, k)] for k in kinds})


async def _channel(connection: aiormq.abc.AbstractConnection, **options: Any) -> aiormq.abc.AbstractChannel:
    """aiormq's ``channel()``, whose connection closed under it raises a bare ``RuntimeError``:
    a ``ConnectionError`` here, so that callers get ``BrokerUnavailableError`` (a chaos run saw the
    RuntimeError reach a caller, and end the reconnect for good)."""
    if connection.is_closed:
        raise ConnectionError(f"{connection!r} closed")
    try:
        return await connection.channel(**options)
    except RuntimeError as exc:
        if isinstance(exc, aiormq.exceptions.ChannelInvalidStateError) or not connection.is_closed:
            raise
        raise ConnectionError(str(exc)) from exc


async def _abandoned(declare: asyncio.Future[Any], channel: aiormq.abc.AbstractChannel) -> None:
    """An unanswered probe runs out (RabbitMQ 4: a 404 after about a minute, which closes its
    channel); a late answer closes the channel. Never cancelled for being late: aiormq would
    close the channel then, and log RabbitMQ's late close as an error."""
    declare.add_done_callback(_retrieve)
    with contextlib.suppress(Exception):
        await asyncio.shield(declare)  # close() cancels this task, not the declare: no close of
        await _close_quietly(channel, 10.0)  # the channel then, the connection's ends it


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Take a finished future's outcome, so that asyncio never reports it as unretrieved."""
    if not future.cancelled():
        future.exception()


async def _close_quietly(channel: aiormq.abc.AbstractChannel, bound: float) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(bound):
            await channel.close()


def _properties(message: Any) -> Any:
    """py-amqp's message properties (as Celery's formatting made them) as aiormq's."""
    props = message.properties
    return Basic.Properties(
        content_type=props.get("content_type"),
        content_encoding=props.get("content_encoding"),
        headers=props.get("application_headers"),
        delivery_mode=props.get("delivery_mode"),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to") or None,
    )


@contextlib.asynccontextmanager
async def _broker_call(what: str, job_id: uuid.UUID | None = None) -> AsyncIterator[None]:
    """Translate what the broker library raises into ``BrokerUnavailableError``.

    aiormq cancels the calls under way when their connection closes (ours closes a silent one):
    a ``CancelledError`` nobody asked for (the task is not being cancelled) is such a failure.
    """
    try:
        yield
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise BrokerUnavailableError(
            f"{what}: the connection was lost; the client reconnects by itself", job_id=job_id
        ) from exc


def _unavailable(exc: BaseException, what: str) -> BrokerUnavailableError:
    if isinstance(exc, BrokerUnavailableError):
        return exc
    error = BrokerUnavailableError(f"{what}: {redact(repr(exc))}; the client reconnects by itself")
    error.__cause__ = exc
    return error


def _job_id(job: Job | uuid.UUID | str) -> uuid.UUID:
    return job.id if isinstance(job, Job) else contract.parse_job_id(job)
