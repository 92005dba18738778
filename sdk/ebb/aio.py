"""``AsyncJobClient``: the caller core (``ebb.caller``) on the asyncio transport.

The same core as ``JobClient`` decides everything (``CallerCore`` for the client's life,
``JobTracker`` for each job's messages); this module is only the asyncio transport, method for
method as ``ebb.client`` is the threaded one, over aiormq (the AMQP client aio-pika is built
on): one connection per client, no thread and no task per job. A delivery only feeds the job's
tracker; a callback runs in a short task of its own (plain functions in asyncio's default
executor), so a slow or raising callback never holds up other jobs' deliveries or the
heartbeat. Every wait on the broker is bounded by ``EBB_BROKER_TIMEOUT``, and a connection
silent for a heartbeat interval and a second (aiormq's own test, within two intervals as in the
sync client) is closed and replaced.
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
from typing import Any, Literal, cast

import aiormq
import aiormq.exceptions
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.commands import Connection as ConnectionMethods

from ebb import contract, core, links
from ebb.acks import AckBatch
from ebb.broker_replies import (
    PROBE_BATCH,
    Present,
    Probe,
    Unreachable,
    consumers_reading,
    probe_bound,
    queue_unreachable,
)
from ebb.caller import CallerCore, ConnectPlan, Watch, delete_retry_delays, job_id_of
from ebb.celery_wire import TaskMessages
from ebb.config import Settings
from ebb.contract import JobResult, ProgressUpdate, QueueKind, StatusUpdate
from ebb.errors import (
    BrokerUnavailableError,
    ClientClosedError,
    EbbError,
    InvalidArgumentError,
    JobQueuesExpiredError,
    RegistryUnavailableError,
    broker_unavailable,
)
from ebb.job import Job
from ebb.logfmt import log_event
from ebb.records import JobRecord
from ebb.redact import redact
from ebb.registry import Registry
from ebb.workers import WorkflowCatalog, WorkflowInfo

logger = logging.getLogger("ebb.client")

Callback = Callable[[Job, Any], Any]
Event = StatusUpdate | ProgressUpdate | JobResult
#: The task as aiormq publishes it: body and properties.
Task = tuple[bytes, Basic.Properties]
#: What the broker library raises when a connection or channel fails.
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
#: A broker call that broke, as the library raised it or as translated for a caller.
_BROKEN: tuple[type[BaseException], ...] = (BrokerUnavailableError, *AMQP_ERRORS)


@dataclass(eq=False)
class _Watch(Watch):
    """A job of this client; ``wait()`` awaits ``done``, its core calls hold ``lock``."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: What arrived for ``events()``: kept only for a job without callbacks.
    events: deque[Event] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def _new_watch(
    job: Job, tracker: core.JobTracker[Any], callbacks: dict[core.Callback, Any], record_ttl: timedelta | None
) -> _Watch:
    return _Watch(job, tracker, callbacks, record_ttl, events=None if callbacks else deque())


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
        self._core: CallerCore[_Watch, Task] = CallerCore(base, _new_watch)
        self._registry = Registry(base)
        self._writes = _WriteBatch(self._registry)
        self._catalog = WorkflowCatalog(
            self._registry.client, base.task_queue, enabled=base.check_workflows, settings=base
        )
        self._messages = TaskMessages()
        self._tags = itertools.count(1)
        #: Consumer tag -> (job, queue kind): whose consumer RabbitMQ cancelled.
        self._consumer_of: dict[str, tuple[_Watch, QueueKind]] = {}
        self._cancelled: list[tuple[_Watch, QueueKind, str]] = []
        self._cancel_runner: asyncio.Future[None] | None = None
        #: Set while RabbitMQ does not block the connection (see ``CallerCore.blocked``).
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        # One submit at a time on the wire (its declares, its task, the task's confirm: one round
        # trip). RabbitMQ's channel works harder per job with several outstanding: 1,000 at once
        # cost its channel process 27 % more reductions per job, two at once 10 % more, than
        # one at a time. A burst of submits still goes at one per round trip (~1 ms locally).
        self._submitting = asyncio.Lock()
        # Queue deletes too go one job at a time: their time bound is then RabbitMQ's answer, not
        # a wait behind thousands of others (10,000 results at once timed out there, and the
        # cancelled call closed the channel under every delete still waiting).
        self._deleting = asyncio.Lock()
        self._deletes_retry: asyncio.Future[Any] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._connection: aiormq.Connection | None = None
        self._consume_channel: aiormq.Channel
        self._publish: aiormq.abc.AbstractChannel
        #: Probe channels that answered, kept for the next probes (as ``QueueProbes`` keeps them).
        self._probes: list[aiormq.abc.AbstractChannel] = []
        self._ready = asyncio.Event()
        # One burst of work (what the reader handed over before the loop idles) ends in one
        # flush: a multiple-ack, one pipelined registry write, then the waiters wake.
        self._acks = AckBatch()
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
                await self._open_connection(url)
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

    async def _open_connection(self, url: str) -> None:
        async with asyncio.timeout(self.settings.broker_timeout):
            tls = links.tls_context(self.settings) if url.startswith("amqps:") else None
            connection = _Connection(url, context=tls)
            connection.on_blocked, connection.on_unblocked = self._on_blocked, self._on_unblocked
            await connection.connect()
            self._on_unblocked()  # a new connection is not blocked until it publishes into an alarm
            self._consume_channel = cast(aiormq.Channel, await _channel(connection, publisher_confirms=False))
            self._consume_channel.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
            await self._consume_channel.basic_qos(prefetch_count=0)
            self._publish = await _channel(connection, publisher_confirms=True, on_return_raises=True)
        self._acks.clear()
        self._connection = connection
        self._probes = []
        self._ready.set()

    async def _on_connected(self) -> None:
        """After a reconnect: the deletes and tasks owed to the broker, then every job resumed."""
        for job_id, kinds in list(self._core.deletes_owed.items()):
            await self._delete_queues(job_id, kinds)
        for job, task in list(self._core.unsettled.due(time.time())):
            try:
                outcome = await self._send_task(job, task)
            except BrokerUnavailableError as exc:
                outcome = redact(repr(exc))
            self._resend_settled(job, outcome)
        await self._resume(self._core.resumable())
        log_event(logger, logging.INFO, "jobs_resumed", jobs=len(self._core.watches))

    async def _resume(self, watches: list[_Watch], vanished: str = core.VANISHED_WHILE_DISCONNECTED) -> None:
        """Ask the broker which of these jobs' queues exist (all at once), and go on with what it says."""
        probes = await self._probe(self._core.queue_names(watches))
        for watch in watches:
            async with watch.lock:
                await self._carry_out(watch, self._core.probed(watch, probes, vanished))

    async def _supervise(self) -> None:
        """Watch the connection; when it dies (or goes silent), reconnect and resume every job."""
        while not self._closing:
            assert self._connection is not None
            await self._until_lost(self._connection)
            if self._closing:
                return
            self._ready.clear()
            log_event(logger, logging.WARNING, "connection_lost", action="reconnecting")
            self._on_lost()
            deadline = time.monotonic() + self.settings.reconnect_timeout
            delay = 0.25
            while not self._closing:
                try:
                    await self._connect()
                    await self._on_connected()
                    break
                except Exception as exc:  # never let the reconnect die: the client would be stuck
                    if not isinstance(exc, AMQP_ERRORS):
                        log_event(
                            logger, logging.WARNING, "reconnect_attempt_failed", error=redact(repr(exc))
                        )
                    if time.monotonic() > deadline:
                        await self._on_failure(exc)
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

    def _on_lost(self) -> None:
        self._core.connection_lost()
        self._consumer_of.clear()
        self._cancelled.clear()  # the reconnect probes every job

    async def _on_failure(self, exc: BaseException) -> None:
        self._failure = exc
        for watch, actions in self._core.failed(exc):
            await self._carry_out(watch, actions)

    def _on_blocked(self, reason: str) -> None:
        """RabbitMQ's ``connection.blocked`` (aiormq's reader calls this: no I/O here)."""
        self._unblocked.clear()
        self._core.blocked(reason)

    def _on_unblocked(self) -> None:
        self._core.unblocked()
        self._unblocked.set()

    def _on_consumer_cancelled(self, frame: Basic.Cancel) -> None:
        """RabbitMQ cancelled a consumer (queue deleted, or its node down). A node going down
        cancels many at once: one task probes them together (aiormq's reader runs this
        callback, so never here)."""
        tag = str(frame.consumer_tag)
        found = self._consumer_of.pop(tag, None)
        if found is None:
            return
        self._cancelled.append((*found, tag))
        if self._cancel_runner is None or self._cancel_runner.done():
            self._cancel_runner = self._spawn(self._after_cancels())

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
        plan = self._core.plan_submit(
            workflow,
            params,
            on_finished=on_finished,
            on_progress=on_progress,
            on_status=on_status,
            auto_disconnect=auto_disconnect_on_result,
            ttl=auto_cleanup_after_ttl,
            reference=reference,
            job_timeout=job_timeout,
            updates=updates,
        )
        await self._channel_ready()
        if not self._catalog.knows(workflow):
            await asyncio.to_thread(self._catalog.check, workflow, self._consumers_from_thread)
        params_dict = self._catalog.params_for(workflow, plan.params)
        watch, request, record = self._core.submission(plan, params_dict, time.time())
        job = watch.job
        await self._writes.write(job.id, job.ttl, record)
        try:
            await self._until_unblocked()
            async with self._submitting:
                await self._submit_on_loop(watch, request)
        except EbbError as exc:
            error, fields = self._core.submit_failed(watch, exc)
            if fields is not None:
                await self._writes.write(job.id, job.ttl, fields)
            if error is exc:
                raise
            raise error from exc
        log_event(logger, logging.INFO, "job_submitted", job_id=job.id, workflow=workflow, ttl=job.ttl)
        return job

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
        """As ``JobClient.connect_to_submitted_job``; a job connected without callbacks is read
        with ``events()``."""
        plan = self._core.plan_connect(
            job,
            on_finished=on_finished,
            on_progress=on_progress,
            on_status=on_status,
            auto_disconnect=auto_disconnect_on_result,
            ttl=auto_cleanup_after_ttl,
            for_events=True,
        )
        await self._channel_ready()
        handle, record_ttl = (
            (plan.known, plan.known.ttl)
            if plan.known
            else await asyncio.to_thread(self._registry.describe, plan.job_id, self.settings.default_ttl)
        )
        connected = await self._connect_on_loop(plan, handle, record_ttl)
        if not connected:
            raise JobQueuesExpiredError(
                plan.job_id, await asyncio.to_thread(self._registry.story, plan.job_id)
            )
        log_event(logger, logging.INFO, "job_connected", job_id=plan.job_id)
        return handle

    async def disconnect_from_submitted_job(
        self, job: Job | uuid.UUID | str, *, delete_queues: bool | None = None
    ) -> None:
        """As ``JobClient.disconnect_from_submitted_job``."""
        job_id = job_id_of(job)
        watch = self._core.connected_job(job_id)
        async with watch.lock:
            await self._carry_out(watch, self._core.disconnect(watch, delete_queues, time.time()))
        log_event(logger, logging.INFO, "job_disconnected", job_id=job_id)

    async def wait(self, job: Job | uuid.UUID | str, timeout: float | None = None) -> JobResult:
        """As ``JobClient.wait``. Cancelling it (or a timeout around it) never loses the job."""
        watch = self._core.known(job_id_of(job))
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
                raise self._core.wait_timed_out(watch, timeout)
        return self._core.outcome(watch)

    async def events(self, job: Job | uuid.UUID | str) -> AsyncIterator[Event]:
        """Status and progress updates, then the result; what waited in the queues comes first."""
        watch = self._core.known(job_id_of(job))
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
        job_id = job_id_of(job)
        record = await asyncio.to_thread(self._registry.request_cancel, job_id, time.time())
        log_event(logger, logging.INFO, "job_cancel_requested", job_id=job_id, status=record.status)

    async def job_status(self, job: Job | uuid.UUID | str) -> JobRecord:
        """As ``JobClient.job_status``: Redis only, never renews a queue's TTL."""
        return await asyncio.to_thread(self._registry.record_of, job_id_of(job))

    async def list_workflows(self) -> list[WorkflowInfo]:
        return await asyncio.to_thread(self._catalog.list)

    async def close(self) -> None:
        """Close the connection; unfinished jobs keep their queues until their TTL runs out."""
        self._closing = True
        for watch, actions in self._core.close(time.time()):  # their TTL clock starts now
            await self._carry_out(watch, actions)
        if self._flusher is not None:  # the last records and wake-ups, before the connection goes
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(self.settings.broker_timeout):
                    await asyncio.shield(self._flusher)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._connection is not None:
            # RabbitMQ reads nothing from a connection it blocks (a resource alarm): its close-ok
            # never comes, so that close is given a moment, not the usual bound.
            bound = 5.0 if self._core.blocked_by is None else 0.5
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(bound):
                    await self._connection.close()

    # --- helpers -------------------------------------------------------------------------

    async def _until_unblocked(self) -> None:
        """While RabbitMQ blocks the connection, a submit waits (within its bound) for the unblock."""
        if self._core.blocked_by is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.broker_timeout):
                    await self._unblocked.wait()

    async def _check_lost(self, watch: _Watch) -> None:
        """As ``JobClient._check_lost``: the registry's word on a result the worker gave up on."""
        if not self._core.lost_check_due(watch, time.monotonic()):
            return
        try:
            record = await asyncio.to_thread(self._registry.get, watch.job.id)
        except RegistryUnavailableError:
            return
        if record is None or not record.lost:
            return
        with contextlib.suppress(EbbError):  # no broker now: the deletes wait for the reconnect
            async with watch.lock:
                await self._carry_out(watch, self._core.result_lost(watch, record, time.time()))

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
        return consumers_reading(queue, (await self._probe({queue}))[queue])

    # --- on the event loop ---------------------------------------------------------------

    async def _submit_on_loop(self, watch: _Watch, request: contract.TaskRequest) -> None:
        await self._channel_ready()
        blocked = self._core.may_publish()
        if blocked is not None:  # nothing goes out: RabbitMQ would not read it
            raise blocked
        message = self._messages.task(request)
        task = (
            message.body.encode() if isinstance(message.body, str) else message.body,
            _properties(message),
        )
        outcome = await self._send_task(watch.job, task, watch)
        await self._task_settled(watch, outcome, task)

    async def _send_task(self, job: Job, task: Task, watch: _Watch | None = None) -> str | None:
        """The job's queue declares, then its task (mandatory, confirmed), within the bound: None
        when the broker took it, else why not ("returned", "nacked", "timeout", what broke).

        ``BrokerUnavailableError`` when it could not be sent at all.
        """
        try:
            channel = await self._publish_channel()
        except AMQP_ERRORS as exc:
            raise broker_unavailable(exc, f"opening a channel for job {job.id}") from exc
        # nowait: the task's confirm below means these were done before it.
        await self._declare_queues(job, nowait=True, channel=channel)
        if watch is not None:
            self._core.publishing(watch)
        body, properties = task
        try:
            async with (
                _broker_call(f"publishing job {job.id}", job.id),
                asyncio.timeout(self.settings.broker_timeout),
            ):
                await channel.basic_publish(
                    body, routing_key=self.settings.task_queue, properties=properties, mandatory=True
                )
        except aiormq.exceptions.DeliveryError as refused:
            return "nacked" if isinstance(refused.frame, Basic.Nack) else "returned"
        except TimeoutError:
            return "timeout"
        except BrokerUnavailableError:
            return "connection lost"
        except AMQP_ERRORS as exc:
            return redact(repr(exc))
        return None

    def _resend_settled(self, job: Job, outcome: str | None) -> None:
        """The broker's answer to a task sent again after a reconnect."""
        for event, level, fields in self._core.unsettled.settled(job, outcome):
            log_event(logger, level, event, job_id=job.id, queue=self.settings.task_queue, **fields)

    async def _task_settled(self, watch: _Watch, outcome: str | None, task: Task) -> None:
        """The broker's answer to a job's task publish (the declares before it are done then)."""
        if outcome is None:
            actions = self._core.task_confirmed(watch)
            try:
                async with watch.lock:
                    await self._carry_out(watch, actions)
            except _BROKEN as exc:
                # Confirmed: a break now is the reconnect's to resume; the submit succeeded.
                log_event(
                    logger,
                    logging.WARNING,
                    "job_connected_before_a_reconnect",
                    job_id=watch.job.id,
                    error=exc,
                )
            return
        if outcome in ("returned", "nacked"):
            queue = self.settings.task_queue
            probe: Probe | Literal["unprobed"] = "unprobed"
            try:
                await self._carry_out(watch, self._core.task_refused(watch))
                probe = (await self._probe({queue}))[queue]  # why it was refused
            except _BROKEN:  # the caller hears it even when the connection broke meanwhile
                pass
            raise self._core.refused_error(watch, outcome, probe)
        raise self._core.task_unconfirmed(watch, task, outcome, time.time())

    async def _connect_on_loop(self, plan: ConnectPlan, handle: Job, record_ttl: timedelta | None) -> bool:
        """Probe the job's queues and consume them; False when its result queue is gone."""
        self._core.begin_connect(plan.job_id)
        try:
            unsent = self._core.unsettled.job(plan.job_id)
            if unsent is not None:  # its task goes again after a reconnect: so do its queues
                await self._declare_queues(unsent, nowait=False)
            probes = await self._probe(plan.queue_names)
            connected = self._core.connected(plan, handle, record_ttl, probes, time.time())
        finally:
            self._core.end_connect(plan.job_id)
        if connected is None:
            return False
        watch, actions = connected
        try:
            async with watch.lock:
                await self._carry_out(watch, actions)
        except _BROKEN as exc:
            # Connected all the same: the reconnect resumes the job with the others (a caller
            # who tried again was told "already connected", chaos run).
            log_event(
                logger, logging.WARNING, "job_connected_before_a_reconnect", job_id=plan.job_id, error=exc
            )
        return True

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
            raise broker_unavailable(exc, f"declaring the queues of job {job.id}") from exc

    async def _after_cancels(self) -> None:
        """Consumers RabbitMQ cancelled: the core decides, then the jobs are probed together."""
        await asyncio.sleep(0.1)  # the rest of the burst joins this round
        while self._cancelled:
            cancelled, self._cancelled = self._cancelled, []
            probing: list[_Watch] = []
            for watch, kind, tag in cancelled:
                async with watch.lock:
                    actions = self._core.consumer_cancelled(watch, kind, tag)
                    if actions is None:
                        continue
                    with contextlib.suppress(*AMQP_ERRORS, EbbError):
                        await self._carry_out(watch, actions)
                if watch not in probing:
                    probing.append(watch)
            if probing:
                with contextlib.suppress(*AMQP_ERRORS, EbbError):  # broken: the reconnect resumes them
                    await self._resume(probing, core.CANCELLED_VANISHED)

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
            raise broker_unavailable(exc, f"a passive declare of {name}") from exc
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
            raise broker_unavailable(exc, "opening a channel for a passive declare") from exc

    def _keep_probe(self, channel: aiormq.abc.AbstractChannel) -> None:
        if len(self._probes) < _IDLE_PROBES:
            self._probes.append(channel)
        else:
            self._spawn(_close_quietly(channel, self.settings.broker_timeout))

    async def _delete_queues(
        self, job_id: uuid.UUID, kinds: frozenset[QueueKind], *, retry: bool = True
    ) -> None:
        """Delete them; owed until done: a delete the connection cuts off is done after the
        reconnect, one that failed on a live connection is tried again (``_delete_owed``)."""
        self._core.delete_started(job_id, kinds)
        names = [contract.queue_name(job_id, k) for k in sorted(kinds)]
        async with self._deleting:
            with contextlib.suppress(BrokerUnavailableError, *AMQP_ERRORS):
                async with _broker_call("deleting queues"), asyncio.timeout(self.settings.broker_timeout):
                    channel = await self._publish_channel()
                    for name in names[:-1]:
                        await channel.queue_delete(name, nowait=True)
                    if names:  # the last one waits, so all are gone when this returns
                        await channel.queue_delete(names[-1])
                for name in names:
                    log_event(logger, logging.DEBUG, "queue_deleted", job_id=job_id, queue=name)
                self._core.delete_done(job_id)
                return
        if retry and (self._deletes_retry is None or self._deletes_retry.done()):
            self._deletes_retry = self._spawn(self._delete_owed())

    async def _delete_owed(self) -> None:
        """Deletes owed on a live connection, tried again with backoff until done or disconnected."""
        for delay in delete_retry_delays():
            await asyncio.sleep(delay)
            if self._closing or self._connection is None or self._connection.is_closed:
                return  # the reconnect does them (_on_connected), or nobody needs them now
            owed = list(self._core.deletes_owed.items())
            if not owed:
                return
            log_event(logger, logging.WARNING, "queue_deletes_retried", jobs=len(owed))
            for job_id, kinds in owed:
                await self._delete_queues(job_id, kinds, retry=False)

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
        if self._core.watches.get(watch.job.id) is not watch:  # it left: keep the message queued
            await self._reject(message)
            return
        if message.channel is self._consume_channel and isinstance(message.delivery, Basic.Deliver):
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
        """Do what the core decided, in order. A Deliver (one at a time per job) runs in a task of
        its own, or is returned when ``inline``: ``_deliver``, already in one, runs it next.

        When the connection breaks under a broker action, the rest is still carried out without
        the broker (a delete is owed until after the reconnect), and then the error is raised,
        as ``JobClient._carry_out`` does.
        """
        deliver: core.Deliver | None = None
        broken: BaseException | None = None
        for action in actions:
            if isinstance(action, core.Deliver):
                if inline:
                    deliver = action
                else:
                    self._spawn(self._deliver(watch, action))
            elif isinstance(action, core.Record):
                self._core.record(watch, action)
                self._schedule_flush()
            elif isinstance(action, core.WakeAt):
                self._spawn(self._wake(watch, action.at))
            elif isinstance(action, core.Finish):
                self._finish(watch, action)
            elif broken is not None:
                if isinstance(action, core.DeleteQueues):
                    self._core.delete_started(watch.job.id, action.kinds)
            else:
                try:
                    await self._on_broker(watch, action)
                except _BROKEN as exc:  # the reconnect resumes the job; finish first
                    broken = exc
        if broken is not None:
            raise broken
        return deliver

    async def _on_broker(self, watch: _Watch, action: core.Action) -> None:
        if isinstance(action, core.Ack):
            self._ack(action.token)
        elif isinstance(action, core.Requeue):
            await self._reject(action.token)
        elif isinstance(action, core.Consume):
            await self._consume(watch, action.kinds)
        elif isinstance(action, core.StopConsuming):
            await self._stop_consuming(watch, action.kinds)
        elif isinstance(action, core.DeleteQueues):
            for kind in action.kinds:  # RabbitMQ cancels their consumers with the queue
                self._consumer_of.pop(watch.consumers.pop(kind, ""), None)
            await self._delete_queues(watch.job.id, action.kinds)

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
        if action.retire:
            for tag in watch.consumers.values():
                self._consumer_of.pop(tag, None)
        self._core.finish(watch, action)
        self._schedule_flush()

    def _ack(self, message: DeliveredMessage) -> None:
        """Batched: sent with the burst's flush, on the channel the delivery came on."""
        if message.channel is self._consume_channel and isinstance(message.delivery, Basic.Deliver):
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
        if channel is self._consume_channel:
            self._acks.settled_otherwise(tag)
        with contextlib.suppress(*AMQP_ERRORS):
            await channel.basic_reject(tag, requeue=True)

    def _schedule_flush(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _burst_settled(self) -> None:
        """Yield until a whole turn of the loop added nothing to flush: the burst is over.

        A delivery's ack comes a few turns after it (its callback runs in a task of its own),
        so one turn is not enough to collect a burst; RabbitMQ pays per ack frame. A flood of
        results would keep every turn busy: the burst also ends when it is due (``_burst_due``).
        """
        size = -1
        while size != (size := self._acks.pending + self._core.burst_size) and not self._burst_due():
            await asyncio.sleep(0)

    def _burst_due(self) -> bool:
        """As ``JobClient._burst_due``: ``CallerCore.burst_due``."""
        return self._core.burst_due(time.monotonic())

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
                records, signal = self._core.take_burst()
                if plan is None and not records and not signal:
                    return
                if plan is not None and not self._consume_channel.is_closed:
                    with contextlib.suppress(*AMQP_ERRORS):
                        if plan.multiple_up_to is not None:
                            await self._consume_channel.basic_ack(plan.multiple_up_to, multiple=True)
                        for tag in plan.singles:
                            await self._consume_channel.basic_ack(tag)
                if records:
                    await self._writes.write_many(records)
                for watch in signal:
                    watch.done.set()
                    watch.arrived.set()
        finally:
            self._flusher = None

    async def _consume(self, watch: _Watch, kinds: frozenset[QueueKind]) -> None:
        for kind in sorted(kinds):
            tag = f"ebb.{next(self._tags)}"

            async def on_message(message: DeliveredMessage, _kind: QueueKind = kind) -> None:
                await self._on_message(watch, _kind, message)

            try:
                # nowait (aiormq's basic_consume always waits): register the consumer, then send.
                self._consume_channel.consumers[tag] = on_message
                async with _broker_call("consuming"), asyncio.timeout(self.settings.broker_timeout):
                    await self._consume_channel.rpc(
                        Basic.Consume(
                            queue=contract.queue_name(watch.job.id, kind), consumer_tag=tag, nowait=True
                        )
                    )
            except AMQP_ERRORS as exc:
                raise broker_unavailable(exc, f"consuming the queues of job {watch.job.id}") from exc
            watch.consumers[kind] = tag
            self._consumer_of[tag] = (watch, kind)

    async def _stop_consuming(self, watch: _Watch, kinds: frozenset[QueueKind]) -> None:
        for kind in kinds:
            tag = watch.consumers.pop(kind, None)
            if tag is not None:
                self._consumer_of.pop(tag, None)
                with contextlib.suppress(*AMQP_ERRORS):
                    await self._consume_channel.basic_cancel(tag, nowait=True)


class _Connection(aiormq.Connection):
    """aiormq's connection with its own test of a silent connection ("stuck": no frame for
    (heartbeat + 1) s times this) at one: a heartbeat interval and a second, in which RabbitMQ
    sends two heartbeats. aiormq then stops reading, and the connection closes. It also tells
    the client when RabbitMQ blocks it (a resource alarm), with RabbitMQ's reason."""

    HEARTBEAT_GRACE_MULTIPLIER = 1
    on_blocked: Callable[[str], None] | None = None
    on_unblocked: Callable[[], None] | None = None

    # aiormq's reader calls its private handlers (``__handle_connection_blocked``, mangled to
    # these names): ours hear the reason, then aiormq's own run.
    async def _Connection__handle_connection_blocked(self, frame: ConnectionMethods.Blocked) -> None:
        if self.on_blocked is not None:
            self.on_blocked(str(frame.reason or ""))
        await getattr(aiormq.Connection, "_Connection__handle_connection_blocked")(self, frame)  # noqa: B009

    async def _Connection__handle_connection_unblocked(self, frame: ConnectionMethods.Unblocked) -> None:
        if self.on_unblocked is not None:
            self.on_unblocked()
        await getattr(aiormq.Connection, "_Connection__handle_connection_unblocked")(self, frame)  # noqa: B009


#: Probe channels kept open between probes (as ``QueueProbes.IDLE``).
_IDLE_PROBES = 4


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
