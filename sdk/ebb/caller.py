"""A caller's whole life without I/O: every decision ``JobClient`` and ``AsyncJobClient`` take.

``ebb.core.JobTracker`` decides one job's messages. :class:`CallerCore` decides everything
around them, for all of a client's jobs: the arguments of a submit, the record it writes and
the one written when it fails (``NOT_SUBMITTED`` only when the task certainly never left); what
the broker's confirm, return, nack or silence means; whether a connect may go on and what its
probe found; which jobs a reconnect resumes; a consumer the broker cancelled; the connection
blocked by an alarm; disconnect, close and the client's end; every error a caller sees from
these. It also holds the client's jobs (:class:`Watch`), the registry writes of a burst and the
deletes and tasks still owed to the broker.

The two clients are transports over it: they ask, carry out the actions (``ebb.core.Action``)
and report what the broker said. Like ``JobTracker`` it touches no socket, thread or clock
(times are passed in), so one scenario drives it the same way for both transports.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, Literal, Protocol, TypeVar

from ebb import checks, contract
from ebb.broker_replies import Probe, job_queues_present, task_not_taken, task_refused
from ebb.config import Settings
from ebb.contract import JobResult, QueueKind, TaskRequest
from ebb.core import (
    LOST_CHECK_EVERY,
    VANISHED_WHILE_DISCONNECTED,
    Action,
    Callback,
    DeleteQueues,
    Finish,
    FinishedJobs,
    JobTracker,
    Record,
    callbacks_by_name,
)
from ebb.errors import (
    BrokerBlockedError,
    BrokerUnavailableError,
    ClientClosedError,
    EbbError,
    InvalidArgumentError,
    JobQueuesUnavailableError,
    WaitTimeoutError,
)
from ebb.job import Job
from ebb.logfmt import log_event
from ebb.records import NOT_SUBMITTED, SUBMITTED, JobRecord
from ebb.redact import redact
from ebb.unsettled import UnsettledTasks, unconfirmed_task

logger = logging.getLogger("ebb.client")

#: A burst of work ends (its acks, registry writes and wake-ups are flushed) once it holds this
#: many jobs, the batch of one Redis pipeline...
BURST_JOBS = 1000
#: ... or is this old (seconds). Without the bound, results that kept arriving while a burst was
#: handled (each result's queue delete reads frames, and more deliveries with them) kept it open:
#: 10,000 jobs released at once to the workers ended in bursts of hundreds of jobs over seconds,
#: so their ``wait()`` woke, and their acks and records went out, only once the flood was over
#: (``bench/bench_burst.py``).
BURST_SECONDS = 0.1


def delete_retry_delays() -> Iterator[float]:
    """Pauses before a queue delete that failed on a live connection is tried again (0.5 s,
    doubling, then every 30 s): the asyncio client's deletes time out one by one, not with the
    connection, so waiting for a reconnect would leave the queues until their TTL."""
    delay = 0.5
    while True:
        yield delay
        delay = min(delay * 2, 30.0)


class Signal(Protocol):
    """What wakes a ``wait()``: ``threading.Event`` for the sync client, ``asyncio.Event`` for the other."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...


@dataclass(eq=False)
class Watch:
    """One job a client submitted or connected to: its tracker, callbacks, consumers and outcome."""

    job: Job
    tracker: JobTracker[Any]
    callbacks: dict[Callback, Callable[..., Any]]
    #: The TTL the registry record has; ``None`` when unknown (a bare id with no record).
    record_ttl: timedelta | None
    done: Signal
    #: Consumer tag per queue, as the transport named them.
    consumers: dict[QueueKind, str] = field(default_factory=dict)
    result: JobResult | None = None
    error: EbbError | None = None
    #: The task's publish was written: from here on the job may run, whatever the broker says.
    sent: bool = False
    #: The broker returned or nacked the task: it certainly will not run.
    refused: bool = False
    #: The submitting caller stopped waiting for the task's confirm (its queues wait for a reconnect).
    abandoned: bool = False
    #: When ``wait()`` last asked the registry whether the result was lost (``core.LOST_CHECK_EVERY``).
    lost_checked_at: float = field(default_factory=time.monotonic)


W = TypeVar("W", bound=Watch)
#: The transport's task message (py-amqp's ``amqp.Message``; aiormq's body and properties).
Message = TypeVar("Message")


@dataclass(frozen=True)
class SubmitPlan:
    """A submit's arguments once checked: what the workflow check and the job are made from."""

    workflow: str
    params: dict[str, Any]
    ttl: timedelta
    timeout: float | None
    kinds: frozenset[QueueKind]
    auto_disconnect: bool
    callbacks: dict[Callback, Callable[..., Any]]
    reference: str | None


@dataclass(frozen=True)
class ConnectPlan:
    """A connect's arguments once checked: which job, and which of its queues to look for."""

    job_id: uuid.UUID
    known: Job | None
    wanted: frozenset[QueueKind]
    auto_disconnect: bool
    callbacks: dict[Callback, Callable[..., Any]]

    @property
    def queue_names(self) -> set[str]:
        """The queues the connect probes."""
        return {contract.queue_name(self.job_id, kind) for kind in self.wanted}


def job_id_of(job: Job | uuid.UUID | str) -> uuid.UUID:
    """The id a public method was given a job by (a ``Job``, a UUID or its text)."""
    return job.id if isinstance(job, Job) else contract.parse_job_id(job)


class CallerCore(Generic[W, Message]):
    """The decisions and the bookkeeping of one client; its transport does the I/O.

    ``new_watch(job, tracker, callbacks, record_ttl)`` makes the transport's :class:`Watch` (each
    transport adds what its I/O needs, and brings its own ``done`` signal).
    """

    def __init__(
        self,
        settings: Settings,
        new_watch: Callable[[Job, JobTracker[Any], dict[Callback, Callable[..., Any]], timedelta | None], W],
    ) -> None:
        self.settings = settings
        self._new_watch = new_watch
        self.watches: dict[uuid.UUID, W] = {}
        self.finished = FinishedJobs(settings.keep_results, settings.keep_results_bytes)
        #: Jobs a ``connect_to_submitted_job`` is probing for: a second connect must not also go on.
        self.connecting: set[uuid.UUID] = set()
        #: Queue deletes the connection cut off: done again after the reconnect.
        self.deletes_owed: dict[uuid.UUID, frozenset[QueueKind]] = {}
        #: Tasks whose confirm never came: sent again after the next reconnect (``ebb.unsettled``).
        self.unsettled: UnsettledTasks[Message] = UnsettledTasks()
        #: RabbitMQ's reason while it blocks the connection (a resource alarm), else ``None``.
        self.blocked_by: str | None = None
        self._records: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]] = {}
        self._to_signal: list[W] = []
        #: When :meth:`burst_due` first saw the current burst hold something (monotonic).
        self._burst_since: float | None = None

    # --- submit ----------------------------------------------------------------------------

    def plan_submit(
        self,
        workflow: str,
        params: Mapping[str, Any] | None,
        *,
        on_finished: Callable[..., Any] | None,
        on_progress: Callable[..., Any] | None,
        on_status: Callable[..., Any] | None,
        auto_disconnect: bool,
        ttl: timedelta | float | None,
        reference: str | None,
        job_timeout: timedelta | float | None,
        updates: bool,
    ) -> SubmitPlan:
        """Check a submit's arguments (before the transport asks the workers about the workflow)."""
        settings = self.settings
        return SubmitPlan(
            workflow=workflow,
            params=checks.job_params(workflow, params, settings.max_params_bytes),
            ttl=checks.validate_ttl(ttl, default=settings.default_ttl, maximum=settings.max_ttl),
            timeout=checks.job_timeout_seconds(job_timeout),
            kinds=checks.wanted_queues(on_progress, on_status, updates=updates),
            auto_disconnect=auto_disconnect,
            callbacks=callbacks_by_name(on_finished, on_progress, on_status),
            reference=reference,
        )

    def submission(
        self, plan: SubmitPlan, params: dict[str, Any], now: float
    ) -> tuple[W, TaskRequest, dict[str, Any]]:
        """The job, its watch, its task request and the record written before the task exists
        (so that the worker's RUNNING can never be overwritten by it)."""
        job = Job(
            id=uuid.uuid4(), workflow=plan.workflow, ttl=plan.ttl, queues=plan.kinds, reference=plan.reference
        )
        watch = self._watch(job, plan.auto_disconnect, plan.callbacks, plan.ttl)
        request = TaskRequest(
            job.id, plan.workflow, params, job.queues, plan.ttl.total_seconds(), plan.timeout
        )
        record = {
            "workflow": plan.workflow,
            "reference": plan.reference,
            "status": SUBMITTED,
            "submitted_at": now,
            "result_delivered": False,
            "queues_last_in_use": now,
        }
        return watch, request, record

    def may_publish(self) -> BrokerBlockedError | None:
        """Before a task goes out: while RabbitMQ blocks the connection, nothing may (the
        transport waits for the unblock, up to its bound, and asks again)."""
        if self.blocked_by is None:
            return None
        return BrokerBlockedError(
            self.blocked_by, f"nothing was published for {self.settings.broker_timeout:g} s; submit again"
        )

    def publishing(self, watch: W) -> None:
        """The transport is about to write the task: from now on the job may run."""
        watch.sent = True

    def task_confirmed(self, watch: W) -> list[Action]:
        """The broker took the task (its queue declares are done then): the job is connected.

        A consume that breaks afterwards is the reconnect's to resume; the submit succeeded.
        """
        if watch.abandoned:  # the caller stopped waiting: its queues wait (TTL) for a reconnect
            return []
        self.watches[watch.job.id] = watch
        self.finished.pop(watch.job.id)
        return watch.tracker.consume(watch.job.queues)

    def task_refused(self, watch: W) -> list[Action]:
        """Returned or nacked: it will not run, and its queues go (the transport then probes the
        task queue to say why: ``broker_replies.task_not_taken``)."""
        watch.refused = True
        return [DeleteQueues(watch.job.queues)]

    def refused_error(
        self, watch: W, outcome: str, probe: Probe | Literal["unprobed"]
    ) -> BrokerUnavailableError:
        """What the caller of a refused task hears, from a probe of the task queue made then
        (returned: no such queue, or on RabbitMQ 3 its node is down; nacked: RabbitMQ 4's answer
        for a node that is down, or a refusal), or without one when the probe could not be made."""
        if probe == "unprobed":
            return BrokerUnavailableError(task_refused(watch.job.id, outcome))
        return BrokerUnavailableError(task_not_taken(self.settings.task_queue, watch.job.id, outcome, probe))

    def task_unconfirmed(
        self, watch: W, message: Message, outcome: str, now: float
    ) -> BrokerUnavailableError:
        """No confirm within the bound, or the connection went: sent again after the reconnect."""
        self.unsettled.add(watch.job, message, now)
        job_id = watch.job.id
        if self.blocked_by is not None:  # the task waits unread until the alarm clears, or is lost
            return BrokerBlockedError(
                self.blocked_by,
                f"the task of job {job_id} went out before the block: RabbitMQ takes it once the alarm "
                "clears if this client's connection lasts until then (if it is lost first, this client "
                "sends the task again once it has reconnected; a client closed or killed before that "
                "leaves the job unrun), and workers run a job once, so do not submit it again: "
                f"connect_to_submitted_job({str(job_id)!r}) waits for its result",
                job_id=job_id,
            )
        detail = unconfirmed_task(job_id, outcome, self.settings.broker_timeout)
        return BrokerUnavailableError(detail, job_id=job_id)

    def submit_failed(self, watch: W, error: EbbError) -> tuple[EbbError, dict[str, Any] | None]:
        """What the caller of a failed submit hears, and what its record says from now on.

        ``NOT_SUBMITTED`` only when the task certainly never ran: never written, or refused. A
        task that went out and whose fate is unknown keeps ``SUBMITTED``, and the caller gets
        its job id (``BrokerUnavailableError.job_id``) to connect to it.
        """
        watch.abandoned = True
        job_id = watch.job.id
        if isinstance(error, BrokerUnavailableError) and error.job_id is not None:
            return error, None
        if watch.sent and not watch.refused:
            maybe = BrokerUnavailableError(
                unconfirmed_task(job_id, type(error).__name__, self.settings.broker_timeout), job_id=job_id
            )
            maybe.__cause__ = error
            return maybe, None
        return error, {"status": NOT_SUBMITTED}

    # --- connect, disconnect ---------------------------------------------------------------

    def plan_connect(
        self,
        job: Job | uuid.UUID | str,
        *,
        on_finished: Callable[..., Any] | None,
        on_progress: Callable[..., Any] | None,
        on_status: Callable[..., Any] | None,
        auto_disconnect: bool,
        ttl: timedelta | float | None,
        for_events: bool = False,
    ) -> ConnectPlan:
        """Check a connect's arguments. ``for_events``: a job read through ``events()`` (no
        callbacks) wants every queue it was submitted with."""
        settings = self.settings
        wanted = checks.wanted_queues(on_progress, on_status)
        job_id, known = checks.reconnect_target(
            job, wanted, ttl, default_ttl=settings.default_ttl, max_ttl=settings.max_ttl
        )
        callbacks = callbacks_by_name(on_finished, on_progress, on_status)
        if for_events and not callbacks:
            wanted = known.queues if known is not None else frozenset(QueueKind)
        return ConnectPlan(job_id, known, wanted, auto_disconnect, callbacks)

    def begin_connect(self, job_id: uuid.UUID) -> None:
        """Claim the job for this connect (until :meth:`end_connect`): a second connect of it,
        even one started while this one probes, is refused."""
        if job_id in self.watches or job_id in self.connecting:
            raise InvalidArgumentError(f"job {job_id} is already connected to this client")
        self.connecting.add(job_id)

    def end_connect(self, job_id: uuid.UUID) -> None:
        self.connecting.discard(job_id)

    def connected(
        self,
        plan: ConnectPlan,
        handle: Job,
        record_ttl: timedelta | None,
        probes: dict[str, Probe],
        now: float,
    ) -> tuple[W, list[Action]] | None:
        """What the connect's probe found: the job connected and its queues consumed, or ``None``
        when its result queue is gone (the transport raises ``JobQueuesExpiredError`` with the
        registry's story). ``JobQueuesUnavailableError`` when one is on a node that is down."""
        present = _present(plan.job_id, plan.wanted, probes)
        if QueueKind.RESULT not in present:
            return None
        for kind in plan.wanted - present:
            log_event(
                logger,
                logging.WARNING,
                "queue_missing",
                job_id=plan.job_id,
                queue=contract.queue_name(plan.job_id, kind),
                detail="job was submitted without it; its callback will not be called",
            )
        watch = self._watch(handle, plan.auto_disconnect, plan.callbacks, record_ttl)
        self.watches[plan.job_id] = watch
        self.finished.pop(plan.job_id)
        actions = [*watch.tracker.consume(frozenset(present)), Record({"queues_last_in_use": now})]
        return watch, actions

    def connected_job(self, job_id: uuid.UUID) -> W:
        """A job this client is connected to (``disconnect_from_submitted_job``)."""
        watch = self.watches.get(job_id)
        if watch is None:
            raise InvalidArgumentError(f"job {job_id} is not connected to this client")
        return watch

    @staticmethod
    def disconnect(watch: W, delete: bool | None, now: float) -> list[Action]:
        return watch.tracker.disconnect(delete, now)

    # --- wait ------------------------------------------------------------------------------

    def known(self, job_id: uuid.UUID) -> W:
        """A job ``wait()`` may wait for: connected, or finished and still remembered."""
        watch = self.watches.get(job_id) or self.finished.get(job_id)
        if watch is None:
            raise InvalidArgumentError(
                f"job {job_id} is not known to this client; submit it or connect_to_submitted_job "
                "first (outcomes of finished jobs are kept for the last EBB_KEEP_RESULTS jobs, "
                "at most EBB_KEEP_RESULTS_BYTES)"
            )
        return watch

    @staticmethod
    def outcome(watch: W) -> JobResult:
        """What ``wait()`` returns or raises once the job's ``done`` is set."""
        if watch.error is not None:
            raise watch.error
        if watch.result is None:
            raise ClientClosedError(f"job {watch.job.id} ended without a result")
        return watch.result

    @staticmethod
    def wait_timed_out(watch: W, timeout: float | None) -> WaitTimeoutError:
        return WaitTimeoutError(
            f"job {watch.job.id} has no result after {timeout} s; it is still running, call wait() again"
        )

    @staticmethod
    def lost_check_due(watch: W, now: float) -> bool:
        """Every ``core.LOST_CHECK_EVERY`` of a wait, the registry is asked (monotonic time)."""
        if now - watch.lost_checked_at < LOST_CHECK_EVERY:
            return False
        watch.lost_checked_at = now
        return True

    @staticmethod
    def result_lost(watch: W, record: JobRecord | None, now: float) -> list[Action]:
        """The registry's record, read during a long wait: did the worker give up on the result?"""
        if record is None or not record.lost:
            return []
        return watch.tracker.result_lost(record.status, record.lost, record.result_delivered, now)

    # --- the connection: lost, resumed, blocked; consumers cancelled -------------------------

    def connection_lost(self) -> None:
        """Unacked deliveries and consumers went with the channel: both come again on resume."""
        for watch in self.watches.values():
            watch.tracker.connection_lost()
            watch.consumers.clear()

    def resumable(self) -> list[W]:
        """The jobs a reconnect resumes: all but those finished and gone."""
        return [w for w in self.watches.values() if not (w.tracker.finished and w.tracker.auto_disconnect)]

    @staticmethod
    def queue_names(watches: list[W]) -> set[str]:
        """Every queue of these jobs, probed at once: on RabbitMQ 4 each queue of a lost node
        takes the probe's whole bound to go unanswered, so one by one would take that many times longer."""
        return {contract.queue_name(w.job.id, k) for w in watches for k in w.job.queues}

    @staticmethod
    def probed(
        watch: W, probes: dict[str, Probe], vanished: str = VANISHED_WHILE_DISCONNECTED
    ) -> list[Action]:
        """What a reconnect's (or a cancel's) probe found for a job: consume what is left, or
        end ``wait()`` when its queues are gone or out of reach (down, not gone: it says so)."""
        job_id = watch.job.id
        try:
            present = _present(job_id, watch.job.queues, probes)
        except JobQueuesUnavailableError as unreachable:
            log_event(
                logger,
                logging.WARNING,
                "job_queues_unreachable",
                job_id=job_id,
                queue=unreachable.queue,
                node=unreachable.node,
            )
            return watch.tracker.abandon(unreachable)
        return watch.tracker.consume(frozenset(present), vanished)

    def consumer_cancelled(self, watch: W, kind: QueueKind, tag: str | None) -> list[Action] | None:
        """RabbitMQ cancelled a consumer (queue deleted, or its node down): the actions before
        the job's probe, or ``None`` when it was the client's own (a delete, a stop, an old job)."""
        if tag is None or watch.consumers.get(kind) == tag:
            watch.consumers.pop(kind, None)
        if self.watches.get(watch.job.id) is not watch:
            return None
        actions = watch.tracker.consumer_cancelled(kind)
        if actions is not None:
            queue = contract.queue_name(watch.job.id, kind)
            log_event(logger, logging.WARNING, "consumer_cancelled", job_id=watch.job.id, queue=queue)
        return actions

    def blocked(self, reason: str) -> None:
        """``connection.blocked``: a resource alarm; publishes wait (results still arrive)."""
        self.blocked_by = reason or "a resource alarm"
        log_event(logger, logging.WARNING, "broker_blocked", reason=self.blocked_by)

    def unblocked(self) -> None:
        if self.blocked_by is not None:
            log_event(logger, logging.WARNING, "broker_unblocked", reason=self.blocked_by)
        self.blocked_by = None

    def delete_started(self, job_id: uuid.UUID, kinds: frozenset[QueueKind]) -> None:
        """Owed until :meth:`delete_done`: a delete the connection cuts off is done after the reconnect."""
        self.deletes_owed[job_id] = kinds

    def delete_done(self, job_id: uuid.UUID) -> None:
        self.deletes_owed.pop(job_id, None)

    # --- outcomes, records, the end --------------------------------------------------------

    def finish(self, watch: W, action: Finish) -> None:
        """A job's outcome: kept for ``wait()``, its waiter woken once the burst's records are written."""
        watch.result, watch.error = action.result, action.error
        if action.result is not None:
            self.unsettled.discard(watch.job.id)
        if action.retire:
            # Remembered before it is forgotten: a wait() on another thread finds it in one of them.
            self.finished.add(watch.job.id, watch, action.size)
            if self.watches.get(watch.job.id) is watch:
                del self.watches[watch.job.id]
            watch.callbacks = {}  # a finished job keeps no reference to the caller's objects
            watch.consumers.clear()
        self._to_signal.append(watch)

    def record(self, watch: W, action: Record) -> None:
        """Batched: one Redis round trip per burst (a job without a known TTL has no record)."""
        if watch.record_ttl is not None:
            self._records.setdefault(watch.job.id, (watch.record_ttl, {}))[1].update(action.fields)

    def take_burst(self) -> tuple[dict[uuid.UUID, tuple[timedelta, dict[str, Any]]], list[W]]:
        """End of a burst: the registry writes to make, then the waiters to wake (in that order,
        so that ``wait()`` returns only once the record says the result was delivered)."""
        records, self._records = self._records, {}
        signal, self._to_signal = self._to_signal, []
        self._burst_since = None
        return records, signal

    @property
    def burst_size(self) -> int:
        return len(self._records) + len(self._to_signal)

    def burst_due(self, now: float) -> bool:
        """Must the burst under way end now, though more work is at hand? Once it holds
        ``BURST_JOBS`` jobs or is ``BURST_SECONDS`` old (monotonic time; its age counts from the
        first call that found it holding something): a steady flood of results then still wakes
        each ``wait()`` within about ``BURST_SECONDS``, and each flush is one Redis pipeline."""
        if not self._records and not self._to_signal:
            return False
        if self._burst_since is None:
            self._burst_since = now
        jobs = max(len(self._records), len(self._to_signal))
        return jobs >= BURST_JOBS or now - self._burst_since >= BURST_SECONDS

    def close(self, now: float) -> Iterator[tuple[W, list[Action]]]:
        """The client closes: every unfinished job's TTL clock starts, and its ``wait()`` ends."""
        for watch in list(self.watches.values()):
            error = ClientClosedError(
                f"job {watch.job.id}: the client was closed before the result arrived; the "
                "queues keep what arrives until their TTL runs out: connect_to_submitted_job"
            )
            yield watch, [Record({"queues_last_in_use": now}), *watch.tracker.abandon(error)]

    def failed(self, cause: BaseException) -> Iterator[tuple[W, list[Action]]]:
        """The client gave up on the broker for good: every ``wait()`` ends and says what to do."""
        error = ClientClosedError(
            f"the client lost its broker connection for good ({redact(repr(cause))}); the job's queues "
            "keep what arrives until their TTL runs out: reconnect with a new client and "
            "connect_to_submitted_job"
        )
        for watch in list(self.watches.values()):
            yield watch, watch.tracker.abandon(error)

    def _watch(
        self,
        job: Job,
        auto_disconnect: bool,
        callbacks: dict[Callback, Callable[..., Any]],
        record_ttl: timedelta | None,
    ) -> W:
        return self._new_watch(job, JobTracker(job, auto_disconnect=auto_disconnect), callbacks, record_ttl)


def _present(job_id: uuid.UUID, kinds: frozenset[QueueKind], probes: dict[str, Probe]) -> set[QueueKind]:
    """Which of these queues of the job exist, from a probe of (at least) their names
    (``JobQueuesUnavailableError`` when one is on a node that is down)."""
    return job_queues_present(job_id, {kind: probes[contract.queue_name(job_id, kind)] for kind in kinds})
