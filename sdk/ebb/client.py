"""``JobClient``: the caller core (``ebb.caller``) on the one-thread transport.

Every decision is the core's: ``CallerCore`` for the client's life (submit, connect, resume,
cancels, alarms, close), ``JobTracker`` for each job's messages. This module only does the I/O
they ask for, on the AMQP connection that :class:`~ebb.sync.BrokerLoop` owns: declares,
publishes and their confirms, consumers, probes, deletes, registry writes and the user's
callbacks. ``ebb.aio`` is the same transport over asyncio, method for method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

import amqp
from amqp import spec
from kombu.connection import Connection

from ebb import contract, core, links
from ebb.broker_replies import Probe, consumers_reading, probe_bound
from ebb.caller import CallerCore, ConnectPlan, Watch, job_id_of
from ebb.celery_wire import TaskMessages
from ebb.config import Settings
from ebb.contract import JobResult, ProgressUpdate, QueueKind, StatusUpdate
from ebb.errors import (
    ClientUsageError,
    EbbError,
    JobQueuesExpiredError,
    RegistryUnavailableError,
)
from ebb.job import Job
from ebb.logfmt import log_event
from ebb.records import JobRecord
from ebb.registry import Registry
from ebb.sync import AMQP_ERRORS, Acks, BrokerLoop, Confirms, QueueProbes, listen_for_blocks
from ebb.workers import WorkflowCatalog, WorkflowInfo

logger = logging.getLogger("ebb.client")

OnFinished = Callable[[Job, JobResult], Any]
OnProgress = Callable[[Job, ProgressUpdate], Any]
OnStatus = Callable[[Job, StatusUpdate], Any]


@dataclass(eq=False)
class _Watch(Watch):
    """A job of this client; ``wait()`` blocks on ``done``."""

    done: threading.Event = field(default_factory=threading.Event)


def _new_watch(
    job: Job, tracker: core.JobTracker[Any], callbacks: dict[core.Callback, Any], record_ttl: timedelta | None
) -> _Watch:
    return _Watch(job, tracker, callbacks, record_ttl)


class JobClient:
    """A caller's connection to Ebb: one AMQP connection and one consumer thread for all its jobs.

    Callbacks (``on_finished``, ``on_progress``, ``on_status``) run on the client's consumer
    thread, one at a time, in arrival order per queue. Keep them short; they may call
    ``submit_job``/``connect_to_submitted_job`` but not ``wait`` or ``close``.
    """

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None) -> None:
        base = settings or Settings.from_env()
        if broker_url is not None:
            base = dataclasses.replace(base, broker_url=broker_url)
        self.settings = base
        self._core: CallerCore[_Watch, amqp.Message] = CallerCore(base, _new_watch)
        self._registry = Registry(base)
        self._catalog = WorkflowCatalog(
            self._registry.client, base.task_queue, enabled=base.check_workflows, settings=base
        )
        self._messages = TaskMessages()
        self._inbox: deque[tuple[_Watch, QueueKind, amqp.Message]] = deque()
        #: Consumers RabbitMQ cancelled (queue deleted, or its node down): (job, queue, tag).
        self._cancelled: deque[tuple[_Watch, QueueKind, str]] = deque()
        self._settled: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, _Watch]] = []
        self._timer_seq = itertools.count()
        self._tags = itertools.count(1)
        #: Set while RabbitMQ does not block the connection (see ``CallerCore.blocked``).
        self._unblocked = threading.Event()
        self._unblocked.set()
        self._consume_channel: amqp.Channel
        self._publish_channel: amqp.Channel
        self._confirms: Confirms
        self._acks: Acks
        self._loop = BrokerLoop(
            self._open_connection,
            on_connected=self._on_connected,
            after_io=self._after_io,
            on_tick=self._on_tick,
            on_lost=self._on_lost,
            on_failure=self._on_failure,
            broker_timeout=base.broker_timeout,
            reconnect_timeout=base.reconnect_timeout,
        )
        self._probes = QueueProbes(self._open_probe_channel, self._loop.read_until)
        try:
            self._loop.start()
        except EbbError:
            raise
        except Exception as exc:
            raise links.broker_connect_error(exc, base) from exc

    # --- connection ----------------------------------------------------------------------

    def _open_connection(self) -> Connection:
        bound = self.settings.broker_timeout
        connection = links.broker_connection(
            self.settings,
            heartbeat=self.settings.heartbeat,
            connect_timeout=min(10.0, bound),
            transport_options={"write_timeout": bound},
        )
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        except Exception as exc:
            tried = getattr(connection, "current_url", None)
            raise links.broker_connect_error(exc, self.settings, tried) from exc
        listen_for_blocks(connection.connection, self._on_blocked, self._on_unblocked)
        return connection

    def _on_connected(self, connection: Connection, reconnected: bool) -> None:
        """Open the channels; after a reconnect, resume every job this client was watching."""
        self._on_unblocked()  # a new connection is not blocked until it publishes into an alarm
        with self._loop.bounded():
            self._consume_channel = connection.channel()
            self._consume_channel.basic_qos(0, 0, False)
            self._acks = Acks(self._consume_channel)
            self._open_publish_channel(connection)
        self._probes.reset()
        if not reconnected:
            return
        self._inbox.clear()  # unacked deliveries of the old channel come again
        self._cancelled.clear()  # so do the consumers
        for job_id, kinds in list(self._core.deletes_owed.items()):
            self._delete_queues(job_id, kinds)
        for job, message in self._core.unsettled.due(time.time()):
            self._send_task(job, message, functools.partial(self._resend_settled, job))
        self._resume(self._core.resumable())
        log_event(logger, logging.INFO, "jobs_resumed", jobs=len(self._core.watches))

    def _resume(self, watches: list[_Watch], vanished: str = core.VANISHED_WHILE_DISCONNECTED) -> None:
        """Ask the broker which of these jobs' queues exist (all at once), and go on with what it says."""
        probes = self._probe(self._core.queue_names(watches))
        for watch in watches:
            self._carry_out(watch, self._core.probed(watch, probes, vanished))

    def _open_publish_channel(self, connection: Connection) -> None:
        channel = connection.channel()
        channel.confirm_select()
        self._publish_channel = channel
        self._confirms = Confirms(channel)

    def _on_lost(self, cause: BaseException) -> None:
        self._confirms.fail_all()
        self._run_settled(connection_lost=True)
        self._core.connection_lost()

    def _on_failure(self, exc: BaseException) -> None:
        for watch, actions in self._core.failed(exc):
            self._carry_out(watch, actions)
        self._flush_without_broker()

    def _on_blocked(self, reason: str) -> None:
        """RabbitMQ's ``connection.blocked`` (read on the loop thread: no I/O here)."""
        self._unblocked.clear()
        self._core.blocked(reason)

    def _on_unblocked(self) -> None:
        self._core.unblocked()
        self._unblocked.set()

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
        updates: bool = False,
    ) -> Job:
        """Declare the job's queues, then publish it; return once the broker has confirmed both.

        ``params`` are checked against the JSON Schema the workflow's workers advertise (typed
        workflows), with its defaults filled in: a bad value raises :class:`ebb.InvalidParamsError`
        (a ``ValueError``) naming the field, before anything is declared.
        Only the queues you asked callbacks for are created (the result queue always is), or
        all three with ``updates=True``, so that a later reconnect can read status and progress.
        ``job_timeout`` limits the job's running time (time spent queued does not count); a job
        that runs longer is stopped and ends with status TIMEOUT. Waits at most
        ``EBB_BROKER_TIMEOUT`` for the broker (and as long again for a resource alarm to clear:
        :class:`ebb.BrokerBlockedError`); a dead connection is noticed within two heartbeat
        intervals (``EBB_HEARTBEAT``).
        """
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
        self._catalog.check(workflow, self._task_queue_consumers)
        params_dict = self._catalog.params_for(workflow, plan.params)
        watch, request, record = self._core.submission(plan, params_dict, time.time())
        job = watch.job
        self._registry.write(job.id, job.ttl, record)
        try:
            self._until_unblocked()
            future: Future[Job] = self._loop.submit(lambda f: self._submit_on_loop(watch, request, f))
            self._loop.result(future, f"submitting job {job.id}")
        except EbbError as exc:
            error, fields = self._core.submit_failed(watch, exc)
            if fields is not None:
                self._registry.write(job.id, job.ttl, fields)
            if error is exc:
                raise
            raise error from exc
        log_event(logger, logging.INFO, "job_submitted", job_id=job.id, workflow=workflow, ttl=job.ttl)
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
        Given a bare id, the job's workflow and TTL come from the registry.
        Raises :class:`JobQueuesExpiredError` when the result queue no longer exists.
        """
        plan = self._core.plan_connect(
            job,
            on_finished=on_finished,
            on_progress=on_progress,
            on_status=on_status,
            auto_disconnect=auto_disconnect_on_result,
            ttl=auto_cleanup_after_ttl,
        )
        handle, record_ttl = (
            (plan.known, plan.known.ttl)
            if plan.known
            else self._registry.describe(plan.job_id, self.settings.default_ttl)
        )
        connected = self._loop.call(
            lambda: self._connect_on_loop(plan, handle, record_ttl), f"connecting to job {plan.job_id}"
        )
        if not connected:
            raise JobQueuesExpiredError(plan.job_id, self._registry.story(plan.job_id))
        log_event(logger, logging.INFO, "job_connected", job_id=plan.job_id)
        return handle

    def disconnect_from_submitted_job(
        self, job: Job | uuid.UUID | str, *, delete_queues: bool | None = None
    ) -> None:
        """Stop listening to a job.

        By default its remaining queues are deleted if its result was already received, and
        kept otherwise (their TTL starts, so you can reconnect until it runs out). Pass
        ``delete_queues=True`` to abandon an unfinished job's queues, ``False`` to keep them.
        """
        job_id = job_id_of(job)

        def disconnect() -> None:
            watch = self._core.connected_job(job_id)
            self._carry_out(watch, self._core.disconnect(watch, delete_queues, time.time()))

        self._loop.call(disconnect, f"disconnecting from job {job_id}")
        log_event(logger, logging.INFO, "job_disconnected", job_id=job_id)

    def wait(self, job: Job | uuid.UUID | str, timeout: float | None = None) -> JobResult:
        """Block until the job's result has been delivered (and its queues cleaned up).

        Returns ERROR, CANCELLED and TIMEOUT results too: ``result.raise_for_status()`` turns them
        into :class:`JobFailedError`. Raises :class:`CallbackError` if one of your callbacks
        raised, ``TimeoutError`` after ``timeout`` seconds (the job goes on running).
        """
        if self._loop.on_loop_thread:
            raise ClientUsageError("wait() cannot be called from a callback: it would block the client")
        watch = self._core.known(job_id_of(job))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not watch.done.wait(core.until_lost_check(watch.lost_checked_at, deadline, time.monotonic())):
            self._check_lost(watch)
            if watch.done.is_set():
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise self._core.wait_timed_out(watch, timeout)
        return self._core.outcome(watch)

    def cancel_job(self, job: Job | uuid.UUID | str) -> None:
        """Ask for the job to stop: a queued job never starts, a running one is interrupted.

        Returns at once; the caller then receives status CANCELLED and a CANCELLED result on the
        job's queues, which are cleaned up as for any result. A job that already finished keeps
        its result. Needs the registry (Redis): raises ``RegistryUnavailableError`` without it.
        """
        job_id = job_id_of(job)
        record = self._registry.request_cancel(job_id, time.time())
        log_event(logger, logging.INFO, "job_cancel_requested", job_id=job_id, status=record.status)

    def job_status(self, job: Job | uuid.UUID | str) -> JobRecord:
        """What the registry knows of a job, read from Redis without touching its queues.

        Never renews the queues' TTL. Raises :class:`UnknownJobError` for a job the registry
        has no record of, ``RegistryUnavailableError`` when Redis cannot be reached.
        """
        return self._registry.record_of(job_id_of(job))

    def list_workflows(self) -> list[WorkflowInfo]:
        """Workflows the live workers on this client's task queue advertise (read from Redis)."""
        return self._catalog.list()

    def close(self) -> None:
        """Close the connection. Jobs still running keep their queues until their TTL runs out."""
        self._loop.stop()
        for watch, actions in self._core.close(time.time()):  # their TTL clock starts now
            self._carry_out(watch, actions)
        self._flush_without_broker()
        connection = self._loop.connection
        if connection is not None:
            # py-amqp waits for the broker's close-ok without a bound of its own (heartbeats keep
            # its reads alive), and RabbitMQ reads nothing from a connection it blocks (a resource
            # alarm): that one is dropped without the handshake, which could never end.
            if self._core.blocked_by is None:
                with contextlib.suppress(Exception), self._loop.bounded():  # broken: nothing to release
                    connection.release()
            with contextlib.suppress(Exception):
                connection.collect()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- helpers on the caller's thread --------------------------------------------------

    def _until_unblocked(self) -> None:
        """While RabbitMQ blocks the connection, a submit waits (within its bound) for the unblock."""
        if self._core.blocked_by is not None and not self._loop.on_loop_thread:
            self._unblocked.wait(self.settings.broker_timeout)

    def _check_lost(self, watch: _Watch) -> None:
        """Every ``core.LOST_CHECK_EVERY`` of a wait: the registry's word on a result the worker
        gave up on (never raises: without Redis the wait goes on as before)."""
        if not self._core.lost_check_due(watch, time.monotonic()):
            return
        try:
            record = self._registry.get(watch.job.id)
        except RegistryUnavailableError:
            return
        if record is None or not record.lost:
            return

        def decide() -> None:
            self._carry_out(watch, self._core.result_lost(watch, record, time.time()))

        with contextlib.suppress(EbbError):  # no broker now: the next check tries again
            self._loop.call(decide, f"giving up on the lost result of job {watch.job.id}")

    def _task_queue_consumers(self) -> int:
        """Workers reading the task queue, asked with a passive declare (the workers' queue, no TTL)."""

        def probe() -> int:
            queue = self.settings.task_queue
            return consumers_reading(queue, self._probe({queue})[queue])

        return self._loop.call(probe, "asking for the task queue's consumers")

    # --- on the loop thread --------------------------------------------------------------

    def _submit_on_loop(self, watch: _Watch, request: contract.TaskRequest, future: Future[Job]) -> None:
        blocked = self._core.may_publish()
        if blocked is not None:  # nothing goes out: RabbitMQ would not read it
            future.set_exception(blocked)
            return
        message = self._messages.task(request)

        def settled(outcome: str | None) -> None:
            self._task_settled(watch, future, outcome, message)

        self._send_task(watch.job, message, settled, watch)

    def _send_task(
        self,
        job: Job,
        message: amqp.Message,
        settled: Callable[[str | None], None],
        watch: _Watch | None = None,
    ) -> None:
        """The job's queue declares, then its task (mandatory, confirmed): one round trip."""
        channel = self._publish_channel
        for kind in sorted(job.queues):
            queue = contract.job_queue(job.id, kind, job.ttl, self.settings.queue_type)
            queue.queue_declare(nowait=True, channel=channel)
        if watch is not None:
            self._core.publishing(watch)
        # The task queue belongs to the workers: callers never declare it (and need no permission
        # to), and a task with no queue to go to comes back (mandatory) instead of vanishing.
        self._confirms.publish(
            message,
            exchange="",
            routing_key=self.settings.task_queue,
            mandatory=True,
            # Runs while frames are read: the work waits for the loop, never recurses into py-amqp.
            on_settled=lambda outcome: self._settled.append(lambda: settled(outcome)),
            deadline=time.monotonic() + self.settings.broker_timeout,
        )

    def _resend_settled(self, job: Job, outcome: str | None) -> None:
        """The broker's answer to a task sent again after a reconnect."""
        for event, level, fields in self._core.unsettled.settled(job, outcome):
            log_event(logger, level, event, job_id=job.id, queue=self.settings.task_queue, **fields)

    def _task_settled(
        self, watch: _Watch, future: Future[Job], outcome: str | None, message: amqp.Message
    ) -> None:
        """The broker's answer to a job's task publish (the declares before it are done then)."""
        if outcome is None:
            actions = self._core.task_confirmed(watch)
            future.set_result(watch.job)  # confirmed: a break below is the reconnect's to resume
            self._carry_out(watch, actions)
            return
        if outcome in ("returned", "nacked"):
            queue = self.settings.task_queue
            probe: Probe | Literal["unprobed"] = "unprobed"
            try:
                self._carry_out(watch, self._core.task_refused(watch))
                probe = self._probe({queue})[queue]  # why it was refused
            finally:  # the caller hears it even when the connection broke meanwhile
                future.set_exception(self._core.refused_error(watch, outcome, probe))
            return
        future.set_exception(self._core.task_unconfirmed(watch, message, outcome, time.time()))

    def _connect_on_loop(self, plan: ConnectPlan, handle: Job, record_ttl: timedelta | None) -> bool:
        """Probe the job's queues and consume them; False when its result queue is gone."""
        self._core.begin_connect(plan.job_id)
        try:
            unsent = self._core.unsettled.job(plan.job_id)
            if unsent is not None:  # its task goes again after a reconnect: so do its queues
                with self._loop.bounded():
                    for kind in sorted(unsent.queues):
                        queue = contract.job_queue(plan.job_id, kind, unsent.ttl, self.settings.queue_type)
                        queue.queue_declare(channel=self._publish_channel)
            probes = self._probe(plan.queue_names)
            connected = self._core.connected(plan, handle, record_ttl, probes, time.time())
        finally:
            self._core.end_connect(plan.job_id)
        if connected is None:
            return False
        try:
            self._carry_out(*connected)
        except AMQP_ERRORS as exc:
            # Connected all the same: the reconnect this break brings resumes the job with
            # the others (a caller who tried again was told "already connected", chaos run).
            log_event(
                logger,
                logging.WARNING,
                "job_connected_before_a_reconnect",
                job_id=plan.job_id,
                error=repr(exc),
            )
        return True

    def _open_probe_channel(self) -> amqp.Channel:
        connection = self._loop.connection
        assert connection is not None
        with self._loop.bounded():
            return connection.channel()

    def _probe(self, names: set[str]) -> dict[str, Probe]:
        """Passive declares, all at once, each on a channel of its own (``QueueProbes``): a 404
        closes its channel, and a queue that does not answer in time costs only its own."""
        return self._probes.probe(sorted(names), probe_bound(self.settings.broker_timeout))

    def _delete_queues(self, job_id: uuid.UUID, kinds: frozenset[QueueKind]) -> None:
        self._core.delete_started(job_id, kinds)  # done again after a reconnect if cut off here
        channel = self._publish_channel
        names = [contract.queue_name(job_id, k) for k in sorted(kinds)]
        for name in names[:-1]:
            channel.queue_delete(name, nowait=True)
        if names:
            # The last delete waits for its reply, so all of them are done when this returns.
            last = names[-1]
            self._loop.rpc(
                lambda: channel.send_method(spec.Queue.Delete, "Bsbbb", (0, last, False, False, False)),
                channel,
                spec.Queue.DeleteOk,
                f"deleting {last}",
            )
        for name in names:
            log_event(logger, logging.DEBUG, "queue_deleted", job_id=job_id, queue=name)
        self._core.delete_done(job_id)

    def _after_io(self) -> None:
        with self._flushed():
            while self._inbox:
                self._on_message(*self._inbox.popleft())
                if self._burst_due():  # a flood of results keeps refilling the inbox
                    self._flush()
            self._after_cancels()

    def _burst_due(self) -> bool:
        """Whether the burst must end now though more work is at hand (``CallerCore.burst_due``)."""
        return self._core.burst_due(time.monotonic())

    def _on_message(self, watch: _Watch, kind: QueueKind, message: amqp.Message) -> None:
        if self._core.watches.get(watch.job.id) is not watch:  # it left: keep the message queued
            self._settle(message, requeue=True)
            return
        actions = watch.tracker.received(kind, message.body, message.content_type, message, time.time())
        self._carry_out(watch, actions)

    def _after_cancels(self) -> None:
        """Consumers RabbitMQ cancelled: the core decides, then the jobs are probed together.
        Here, not in py-amqp's callback: a probe from inside it would recurse."""
        probing: list[_Watch] = []
        while self._cancelled:
            watch, kind, tag = self._cancelled.popleft()
            actions = self._core.consumer_cancelled(watch, kind, tag)
            if actions is None:
                continue
            self._carry_out(watch, actions)
            if watch not in probing:
                probing.append(watch)
        if probing:
            self._resume(probing, core.CANCELLED_VANISHED)

    @contextlib.contextmanager
    def _flushed(self) -> Iterator[None]:
        """End the burst with a flush even when the connection broke in it: a job that finished
        wakes its ``wait()`` now, not once the broker is back."""
        try:
            yield
        except BaseException:
            try:
                self._flush()
            except Exception:
                self._flush_without_broker()
            raise
        self._flush()

    def _on_tick(self) -> None:
        with self._flushed():
            self._run_settled()
            self._confirms.expire(time.monotonic())
            self._run_settled()
            now = time.time()
            while self._timers and self._timers[0][0] <= now:
                _, _, watch = heapq.heappop(self._timers)
                self._carry_out(watch, watch.tracker.tick(now))

    def _run_settled(self, *, connection_lost: bool = False) -> None:
        """Run what the broker's confirms decided. Once the connection is known lost, one whose
        broker work fails is logged and the rest still run: raising there would end the
        reconnect for good (a long chaos run on 4.3 saw a sync client give up so)."""
        broken: BaseException | None = None
        while self._settled:
            try:
                self._settled.popleft()()
            except AMQP_ERRORS as exc:
                if not connection_lost:
                    broken = broken or exc
                    continue
                log_event(logger, logging.WARNING, "settle_after_connection_lost_failed", error=repr(exc))
        if broken is not None:
            raise broken

    def _carry_out(self, watch: _Watch, actions: list[core.Action]) -> None:
        """Do what the core decided, in order; a callback's outcome goes back to the tracker.

        When the connection breaks under a broker action, the rest is still carried out without
        the broker (a delete is owed until after the reconnect), and then the error is raised: a
        result already handed to ``on_finished`` must still end ``wait()`` (the chaos run caught
        a delete cut off by ``stop_app`` that left ``wait()`` waiting for ever).
        """
        todo = deque(actions)
        broken: Exception | None = None
        while todo:
            action = todo.popleft()
            if isinstance(action, core.Deliver):
                error = self._run_callback(watch, action)
                todo.extendleft(reversed(watch.tracker.delivered(error, time.time())))
            elif isinstance(action, core.Record):
                self._core.record(watch, action)
            elif isinstance(action, core.WakeAt):
                heapq.heappush(self._timers, (action.at, next(self._timer_seq), watch))
            elif isinstance(action, core.Finish):
                self._finish(watch, action)
            elif broken is not None:
                if isinstance(action, core.DeleteQueues):
                    self._core.delete_started(watch.job.id, action.kinds)
            else:
                try:
                    self._on_broker(watch, action)
                except Exception as exc:  # the loop's error handling decides; finish first
                    broken = exc
        if broken is not None:
            raise broken

    def _on_broker(self, watch: _Watch, action: core.Action) -> None:
        if isinstance(action, core.Ack):
            self._settle(action.token, requeue=False)
        elif isinstance(action, core.Requeue):
            self._settle(action.token, requeue=True)
        elif isinstance(action, core.Consume):
            self._consume(watch, action.kinds)
        elif isinstance(action, core.StopConsuming):
            self._stop_consuming(watch, action.kinds)
        elif isinstance(action, core.DeleteQueues):
            for kind in action.kinds:  # RabbitMQ cancels their consumers with the queue
                watch.consumers.pop(kind, None)
            self._delete_queues(watch.job.id, action.kinds)

    def _finish(self, watch: _Watch, action: core.Finish) -> None:
        self._core.finish(watch, action)  # its waiter wakes with the burst's flush

    def _run_callback(self, watch: _Watch, action: core.Deliver) -> Exception | None:
        callback = watch.callbacks.get(action.callback)
        if callback is None:
            return None
        try:
            callback(watch.job, action.payload)
        except Exception as exc:
            return exc
        return None

    def _flush_without_broker(self) -> None:
        """The loop is gone: no acks to send, but records to write and waiters to wake."""
        self._acks.discard()
        self._flush()

    def _flush(self) -> None:
        """End of a burst: the acks, then the registry writes, then wake whoever waits on a job.

        In that order, so that ``wait()`` returns only once the record says the result was
        delivered, and a burst of 1,000 results costs one Redis round trip, not 1,000.
        """
        self._acks.flush()
        records, signal = self._core.take_burst()
        if records:
            self._registry.write_many(records)
        for watch in signal:
            watch.done.set()

    def _consume(self, watch: _Watch, kinds: frozenset[QueueKind]) -> None:
        for kind in sorted(kinds):
            tag = f"ebb.{next(self._tags)}"

            def on_message(message: amqp.Message, _watch: _Watch = watch, _kind: QueueKind = kind) -> None:
                if message.channel is self._consume_channel:
                    self._acks.delivered(message.delivery_info["delivery_tag"])
                self._inbox.append((_watch, _kind, message))

            self._consume_channel.basic_consume(
                queue=contract.queue_name(watch.job.id, kind),
                consumer_tag=tag,
                callback=on_message,
                on_cancel=lambda tag, _watch=watch, _kind=kind: self._cancelled.append((_watch, _kind, tag)),
                nowait=True,
            )
            watch.consumers[kind] = tag

    def _stop_consuming(self, watch: _Watch, kinds: frozenset[QueueKind]) -> None:
        channel = self._consume_channel
        for kind in kinds:
            tag = watch.consumers.pop(kind, None)
            if tag is not None:
                channel.basic_cancel(tag, nowait=True)
                # py-amqp forgets a consumer only when CancelOk arrives, which nowait never
                # asks for: forget it here, or every job would leave its callbacks behind.
                channel.callbacks.pop(tag, None)
                channel.cancel_callbacks.pop(tag, None)

    def _settle(self, message: amqp.Message, *, requeue: bool) -> None:
        """Ack (batched) or requeue on the channel the delivery came on; after a reconnect it comes again."""
        channel = message.channel
        if channel is not self._consume_channel or not channel.is_open:
            return
        tag = message.delivery_info["delivery_tag"]
        if requeue:
            self._acks.requeue(tag)
        else:
            self._acks.ack(tag)
