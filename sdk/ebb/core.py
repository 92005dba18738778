"""The job protocol without I/O: one :class:`JobTracker` per job, messages in, actions out.

In the style of h11: the tracker never touches a socket, a thread or a clock. A transport hands
it what arrived on the job's queues (``received``), tells it when a callback it asked for has
run (``delivered``) and when a timer it asked for is due (``tick``); the tracker answers with
plain data (:class:`Deliver`, :class:`Ack`, :class:`DeleteQueues`, ...) that the transport
carries out in order. Everything that is policy lives here: dedupe by attempt and sequence
number, results that overtake their status/progress messages, the straggler grace, what a
raising callback means, and when queues may be deleted. So the sync and asyncio clients cannot
drift apart: their transports hold no policy to drift.

Callbacks of one job run one at a time: while a :class:`Deliver` is outstanding, later messages
of that job wait inside the tracker, in arrival order. Times passed in are Unix times.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from ebb import contract
from ebb.contract import JobResult, ProgressUpdate, QueueKind, StatusUpdate
from ebb.errors import (
    CallbackError,
    ClientClosedError,
    EbbError,
    JobQueuesExpiredError,
    JobResultLostError,
    MalformedMessageError,
)
from ebb.job import Job
from ebb.logfmt import log_event

logger = logging.getLogger("ebb.client")

#: How long a result waits for status/progress messages it overtook in the broker.
STRAGGLER_GRACE = 2.0
#: Why a job ends when its result queue is gone: found so after a reconnect (or at connect)...
VANISHED_WHILE_DISCONNECTED = "They vanished while disconnected."
#: ... or after the broker cancelled its consumer.
CANCELLED_VANISHED = (
    "It was deleted while this client consumed it (by an operator or a policy, or its TTL ran "
    "out), and RabbitMQ cancelled the consumer."
)
#: How often a long ``wait()`` asks the registry whether the worker gave up on the result.
LOST_CHECK_EVERY = 10.0


def until_lost_check(checked_at: float, deadline: float | None, now: float) -> float:
    """How long a ``wait()`` sleeps before it next asks the registry whether the result was
    lost (``JobTracker.result_lost``), or gives up at its deadline (monotonic times)."""
    next_check = checked_at + LOST_CHECK_EVERY
    return max(0.0, (next_check if deadline is None else min(next_check, deadline)) - now)


#: A transport's handle on one delivery (py-amqp's delivery tag and channel, aio-pika's message).
Token = TypeVar("Token")
Payload = StatusUpdate | ProgressUpdate | JobResult


class Callback(StrEnum):
    ON_STATUS = "on_status"
    ON_PROGRESS = "on_progress"
    ON_FINISHED = "on_finished"


CALLBACK_FOR: dict[QueueKind, Callback] = {
    QueueKind.STATUS: Callback.ON_STATUS,
    QueueKind.PROGRESS: Callback.ON_PROGRESS,
    QueueKind.RESULT: Callback.ON_FINISHED,
}


def callbacks_by_name(
    on_finished: Callable[..., Any] | None,
    on_progress: Callable[..., Any] | None,
    on_status: Callable[..., Any] | None,
) -> dict[Callback, Callable[..., Any]]:
    """The callbacks a caller passed, keyed as :class:`Deliver` names them."""
    given = {
        Callback.ON_FINISHED: on_finished,
        Callback.ON_PROGRESS: on_progress,
        Callback.ON_STATUS: on_status,
    }
    return {name: callback for name, callback in given.items() if callback is not None}


# --- actions: what the transport must do, in order -----------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """Run the caller's callback with ``payload``, then report with ``JobTracker.delivered``."""

    callback: Callback
    payload: Payload


@dataclass(frozen=True, slots=True)
class Ack(Generic[Token]):
    """Settle the delivery: it is handled (or a duplicate) and must not come again."""

    token: Token


@dataclass(frozen=True, slots=True)
class Requeue(Generic[Token]):
    """Put the delivery back in its queue, for a later reconnect to receive it again."""

    token: Token


@dataclass(frozen=True, slots=True)
class Consume:
    """Start consuming these queues of the job."""

    kinds: frozenset[QueueKind]


@dataclass(frozen=True, slots=True)
class StopConsuming:
    """Cancel the consumers of these queues (a transport may skip it for queues it deletes)."""

    kinds: frozenset[QueueKind]


@dataclass(frozen=True, slots=True)
class DeleteQueues:
    """Delete these queues of the job: their messages are handled, or abandoned on purpose."""

    kinds: frozenset[QueueKind]


@dataclass(frozen=True, slots=True)
class Record:
    """Write these fields into the job's registry record (the transport may batch them)."""

    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Call ``JobTracker.tick`` at (or after) this Unix time."""

    at: float


@dataclass(frozen=True, slots=True)
class Finish:
    """The job's outcome for ``wait()``: a result, an error, or both (a callback raised).

    ``retire``: the job is no longer connected; forget its tracker. ``size`` is the result
    message's size in bytes, for the client's bounded memory of outcomes.
    """

    result: JobResult | None
    error: EbbError | None
    retire: bool
    size: int = 0


Action = Deliver | Ack[Any] | Requeue[Any] | Consume | StopConsuming | DeleteQueues | Record | WakeAt | Finish


@dataclass(slots=True)
class _Arrival(Generic[Token]):
    kind: QueueKind
    payload: Payload
    token: Token
    size: int
    #: The job's final status, taken from its result (``token`` is the result's): never acked.
    from_result: bool = False


@dataclass
class JobTracker(Generic[Token]):
    """What a client knows of one job it is connected to, and what it decides for it.

    ``kinds`` are the queues to consume; ``auto_disconnect`` deletes every queue of the job
    once its result was handled (otherwise only the result queue, and the job stays connected).
    """

    job: Job
    auto_disconnect: bool = True
    grace: float = STRAGGLER_GRACE
    consuming: frozenset[QueueKind] = frozenset()
    attempt: int = 1
    last_seq: dict[QueueKind, int] = field(default_factory=dict)
    result: JobResult | None = None
    error: EbbError | None = None
    finished: bool = False
    _pending: _Arrival[Token] | None = None
    _pending_since: float = 0.0
    _busy: _Arrival[Token] | None = None
    #: The attempt whose final status ``on_status`` has had (a message, or taken from the result).
    _ended_attempt: int = 0
    _detached: bool = False
    _backlog: deque[_Arrival[Token]] = field(default_factory=deque)

    # --- inputs ----------------------------------------------------------------------------

    def consume(
        self, present: frozenset[QueueKind], vanished: str = VANISHED_WHILE_DISCONNECTED
    ) -> list[Action]:
        """The queues that exist (submitted, probed at connect, after a reconnect, or after the
        broker cancelled a consumer): consume them."""
        if self.finished and self.auto_disconnect:
            return []
        if QueueKind.RESULT not in present and self.result is None:
            # Without its result queue the job cannot end here: what is left of it goes too.
            self.finished = True
            actions: list[Action] = [StopConsuming(self.consuming)] if self.consuming else []
            self.consuming = frozenset()
            others = frozenset(self.job.queues) - {QueueKind.RESULT}
            if others:  # deleting a queue that is gone already is a no-op
                actions.append(DeleteQueues(others))
            return [*actions, Finish(None, JobQueuesExpiredError(self.job.id, vanished), True)]
        kinds = present if self.result is None else present - {QueueKind.RESULT}
        self.consuming = kinds
        return [Consume(kinds)] if kinds else []

    def consumer_cancelled(self, kind: QueueKind) -> list[Action] | None:
        """RabbitMQ cancelled the consumer of one of the job's queues: the queue was deleted (an
        operator, its TTL), or its node went down. ``None``: nothing to do (the client's own
        cancel or delete). Otherwise the transport carries out the actions (the job's other
        consumers stop), asks the broker which queues are left, and hands that to
        :meth:`consume` (``vanished=CANCELLED_VANISHED``), or the probe's
        ``JobQueuesUnavailableError`` to :meth:`abandon` (down, not gone)."""
        if kind not in self.consuming or (self.finished and self.auto_disconnect):
            return None
        others = self.consuming - {kind}
        self.consuming = frozenset()
        return [StopConsuming(others)] if others else []

    def received(
        self, kind: QueueKind, body: bytes | str, content_type: str | None, token: Token, now: float
    ) -> list[Action]:
        """A delivery from one of the job's queues."""
        try:
            payload = contract.decode(kind, body, content_type)
            if payload.job_id != self.job.id:
                raise MalformedMessageError(f"message is for job {payload.job_id}")
        except MalformedMessageError as exc:
            log_event(
                logger,
                logging.ERROR,
                "message_malformed",
                job_id=self.job.id,
                queue=contract.queue_name(self.job.id, kind),
                error=exc,
            )
            return [Ack(token)]
        arrival = _Arrival(kind, payload, token, len(body))
        if self._busy is not None:
            self._backlog.append(arrival)
            return []
        return self._process(arrival, now)

    def delivered(self, error: Exception | None, now: float) -> list[Action]:
        """The callback of the last :class:`Deliver` returned (``error=None``) or raised."""
        arrival = self._busy
        if arrival is None:
            raise RuntimeError("delivered() without an outstanding Deliver")
        self._busy = None
        if self._detached:  # disconnected from inside this callback: the message was handled
            return [] if arrival.from_result else [Ack(arrival.token)]
        if error is not None:
            log_event(
                logger,
                logging.ERROR,
                "callback_failed",
                job_id=self.job.id,
                callback=CALLBACK_FOR[arrival.kind].value,
                error=repr(error),
            )
        if arrival.kind is QueueKind.RESULT:
            actions = self._finish(arrival, error, now)
        else:
            if error is not None and self.error is None:
                self.error = CallbackError(self.job.id, CALLBACK_FOR[arrival.kind].value, None)
                self.error.__cause__ = error
            actions = [] if arrival.from_result else [Ack(arrival.token)]
            if self._pending is not None:  # after the final status, its result without more waiting
                actions += self._try_finish(now, force=arrival.from_result)
        while self._busy is None and self._backlog:
            actions += self._process(self._backlog.popleft(), now)
        return actions

    def tick(self, now: float) -> list[Action]:
        """A :class:`WakeAt` came due: deliver a result whose stragglers did not arrive in time."""
        if self._pending is None or self._busy is not None:
            return []
        return self._try_finish(now, force=now >= self._pending_since + self.grace)

    def connection_lost(self) -> None:
        """The transport's channel is gone: its unsettled deliveries will come again.

        A callback already running (the asyncio client runs them in threads) goes on, and its
        ``delivered()`` still counts: a result handed to ``on_finished`` ends ``wait()`` then,
        and is not handed over again when the broker redelivers it.
        """
        self.consuming = frozenset()
        self._pending = None
        self._backlog.clear()

    def result_lost(self, status: str | None, lost: str | None, delivered: bool, now: float) -> list[Action]:
        """The registry's record, read during a long wait: did the worker give up on the result?

        It did when the record says what was lost and nobody took a result. Nothing will
        arrive then: ``wait()`` ends with :class:`JobResultLostError` and the queues go (what
        is left in them is status and progress). A result or callback in hand decides instead.
        """
        if not lost or delivered or self.finished or self.result is not None:
            return []
        if self._pending is not None or self._busy is not None:
            return []
        actions: list[Action] = [StopConsuming(self.consuming)] if self.consuming else []
        self.consuming = frozenset()
        self.finished = True
        actions.append(DeleteQueues(frozenset(self.job.queues)))
        actions.append(Record({"queues_deleted_at": now}))
        actions.append(Finish(None, JobResultLostError(self.job.id, status, lost), True))
        return actions

    def disconnect(self, delete: bool | None, now: float) -> list[Action]:
        """Stop listening; delete the queues if asked, or by default once the result was handled."""
        delete_queues = self.result is not None if delete is None else delete
        actions: list[Action] = [StopConsuming(self.consuming)] if self.consuming else []
        # A callback still running (disconnect called from inside it) settles its own message.
        actions += [Requeue(arrival.token) for arrival in (self._pending, *self._backlog) if arrival]
        self._detached = self._busy is not None
        self.consuming = frozenset()
        if delete_queues:
            actions.append(DeleteQueues(frozenset(self.job.queues)))
        actions.append(
            Record({"queues_last_in_use": now, **({"queues_deleted_at": now} if delete_queues else {})})
        )
        where = (
            "its queues were deleted (delete_queues=True)"
            if delete_queues
            else "its queues wait for connect_to_submitted_job until their TTL runs out"
        )
        actions += self.abandon(
            ClientClosedError(f"job {self.job.id} was disconnected before its result arrived; {where}")
        )
        return actions

    def abandon(self, error: EbbError) -> list[Action]:
        """The client closes or gave up on the broker: end ``wait()`` with ``error`` unless done."""
        self._backlog.clear()
        self._pending = None
        if self.finished and not (self.result is not None and not self.auto_disconnect):
            return []
        self.finished = True
        if self.result is not None:
            return [Finish(self.result, self.error, True)]
        return [Finish(None, error, True)]

    # --- decisions -------------------------------------------------------------------------

    def _process(self, arrival: _Arrival[Token], now: float) -> list[Action]:
        payload = arrival.payload
        if isinstance(payload, JobResult):
            if self._pending is not None or self.result is not None:
                return [Ack(arrival.token)]  # a duplicate (redelivery, or a re-run job): the first counts
            self._pending = arrival
            self._pending_since = now
            return self._try_finish(now, force=False)
        kind = arrival.kind
        if payload.attempt > self.attempt:  # the job was restarted: its numbering starts again
            self.attempt = payload.attempt
            self.last_seq.clear()
        elif payload.attempt < self.attempt or payload.seq <= self.last_seq.get(kind, 0):
            return [Ack(arrival.token)]  # from an earlier attempt, or delivered before: not again
        self.last_seq[kind] = payload.seq
        if isinstance(payload, StatusUpdate) and payload.status in contract.TERMINAL_STATUSES:
            self._ended_attempt = payload.attempt  # a worker of an earlier Ebb sent it
        self._busy = arrival
        return [Deliver(CALLBACK_FOR[kind], payload)]

    def _final_status(self, result: JobResult) -> StatusUpdate | None:
        """The job's final status for ``on_status``, taken from its result.

        Workers send no final status message (one message less per job for RabbitMQ): the
        result carries it, and ``on_status`` still hears it, just before ``on_finished``.
        """
        if QueueKind.STATUS not in self.consuming or result.attempt < self.attempt:
            return None
        if self._ended_attempt == result.attempt:
            return None
        return StatusUpdate(
            self.job.id,
            result.status,
            result.last_seq.get(QueueKind.STATUS, 0) + 1,
            result.at,
            result.attempt,
        )

    def _behind(self, result: JobResult) -> list[QueueKind]:
        """Queues whose messages sent before the result (by the result's attempt) have not all arrived."""
        if result.attempt < self.attempt:
            return []
        seen = self.last_seq if result.attempt == self.attempt else {}  # a re-run: none of its own yet
        return [
            kind
            for kind in sorted(self.consuming - {QueueKind.RESULT})
            if seen.get(kind, 0) < result.last_seq.get(kind, 0)
        ]

    def _try_finish(self, now: float, *, force: bool) -> list[Action]:
        pending = self._pending
        assert pending is not None and isinstance(pending.payload, JobResult)
        behind = self._behind(pending.payload)
        if behind and not force:
            return [WakeAt(self._pending_since + self.grace)]
        if behind:
            log_event(
                logger,
                logging.WARNING,
                "messages_missing",
                job_id=self.job.id,
                queues=",".join(k.value for k in behind),
                detail=f"result delivered after waiting {self.grace}s for them",
            )
        final = self._final_status(pending.payload)
        if final is not None:  # on_status first; the result stays pending until it returns
            self._ended_attempt = final.attempt
            self._busy = _Arrival(QueueKind.STATUS, final, pending.token, 0, from_result=True)
            return [Deliver(Callback.ON_STATUS, final)]
        self._pending = None
        self._busy = pending
        return [Deliver(Callback.ON_FINISHED, pending.payload)]

    def _finish(self, arrival: _Arrival[Token], error: Exception | None, now: float) -> list[Action]:
        result = arrival.payload
        assert isinstance(result, JobResult)
        self.result = result
        self.finished = True
        if error is not None:
            # Keep the result: back into its queue, nobody consuming, so its TTL starts.
            self.error = CallbackError(self.job.id, Callback.ON_FINISHED.value, result)
            self.error.__cause__ = error
            actions: list[Action] = [StopConsuming(self.consuming)] if self.consuming else []
            actions += [Requeue(arrival.token), *(Requeue(a.token) for a in self._backlog)]
            self._backlog.clear()
            self.consuming = frozenset()
            log_event(
                logger,
                logging.WARNING,
                "result_requeued",
                job_id=self.job.id,
                queue=contract.queue_name(self.job.id, QueueKind.RESULT),
            )
            return [
                *actions,
                Record({"queues_last_in_use": now}),
                Finish(result, self.error, True, arrival.size),
            ]
        kinds = frozenset(self.job.queues) if self.auto_disconnect else frozenset({QueueKind.RESULT})
        actions = [Ack(arrival.token)]
        if self.auto_disconnect:
            actions += [Ack(a.token) for a in self._backlog]  # their queues are being deleted
            self._backlog.clear()
        actions += [StopConsuming(self.consuming & kinds), DeleteQueues(kinds)]
        self.consuming -= kinds
        if isinstance(self.error, CallbackError):
            self.error.result = result
        log_event(logger, logging.INFO, "job_finished", job_id=self.job.id, status=result.status.value)
        fields: dict[str, Any] = {
            "status": result.status.value,
            "finished_at": result.at,  # the worker writes it too, once the broker confirmed it
            "result_delivered": True,
            "result_delivered_at": now,
            "queues_last_in_use": now,
        }
        if kinds == frozenset(self.job.queues):
            # Every queue went with the result: the audit then knows that the caller, not the
            # broker, removed them.
            fields["queues_deleted_at"] = now
        return [
            *actions,
            Record(fields),
            Finish(result, self.error, self.auto_disconnect, arrival.size),
        ]


class FinishedJobs:
    """Outcomes kept for a later ``wait()``, bounded by count and by bytes; oldest forgotten first."""

    def __init__(self, max_jobs: int, max_bytes: int) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.bytes = 0

    def add(self, key: Any, value: Any, size: int) -> None:
        self.pop(key)
        self._items[key] = (value, size)
        self.bytes += size
        while self._items and (len(self._items) > self.max_jobs or self.bytes > self.max_bytes):
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def get(self, key: Any) -> Any:
        item = self._items.get(key)
        return None if item is None else item[0]

    def pop(self, key: Any) -> Any:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]

    def __len__(self) -> int:
        return len(self._items)
