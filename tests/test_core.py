"""The job protocol without a broker: messages into a JobTracker, what a client would then do out.

Messages are written as short labels: ``s1`` is status seq 1, ``p2@2`` progress seq 2 of attempt
2, ``r(s1,p2)`` a result whose ``last_seq`` says status 1 and progress 2 were sent before it. A
delivery's token is its label, with a ``'`` for every time the same message came before.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any
from uuid import uuid4

import msgspec
import pytest

from ebb.contract import (
    CONTENT_TYPE,
    TERMINAL_STATUSES,
    JobResult,
    JobStatus,
    ProgressUpdate,
    QueueKind,
    StatusUpdate,
    encode,
    encode_message,
)
from ebb.core import (
    CANCELLED_VANISHED,
    Ack,
    Action,
    Callback,
    Consume,
    DeleteQueues,
    Deliver,
    Finish,
    FinishedJobs,
    JobTracker,
    Payload,
    Record,
    Requeue,
    StopConsuming,
    WakeAt,
)
from ebb.errors import (
    CallbackError,
    ClientClosedError,
    EbbError,
    JobQueuesExpiredError,
    JobResultLostError,
)
from ebb.job import Job

ALL = frozenset(QueueKind)
RESULT_ONLY = frozenset({QueueKind.RESULT})
UPDATES = frozenset({QueueKind.PROGRESS, QueueKind.STATUS})
KIND = {"s": QueueKind.STATUS, "S": QueueKind.STATUS, "p": QueueKind.PROGRESS, "r": QueueKind.RESULT}
LABEL = re.compile(r"(?P<kind>[sSpr])(?P<seq>\d*)(?:\((?P<last>[sp\d,]*)\))?(?:@(?P<attempt>\d+))?")


def label(payload: Payload) -> str:
    """``s1``, ``p2@2``, ``r``, ``S3`` (a final status): what a delivery is, for readable assertions."""
    attempt = "" if payload.attempt == 1 else f"@{payload.attempt}"
    if isinstance(payload, JobResult):
        return f"r{attempt}"
    if isinstance(payload, StatusUpdate):
        kind = "S" if payload.status in TERMINAL_STATUSES else "s"
        return f"{kind}{payload.seq}{attempt}"
    return f"p{payload.seq}{attempt}"


class Driver:
    """Plays the transport as ``JobClient._carry_out`` does, and records what it was told to do.

    ``fail``: labels whose callback raises. ``hold``: leave each Deliver outstanding (a callback
    still running) until :meth:`release`; ``hold_final`` too for the final status the tracker
    takes from the result (``S``), which is otherwise answered at once and kept apart from the
    queues' deliveries (:attr:`final_statuses`).
    """

    def __init__(
        self,
        *,
        auto_disconnect: bool = True,
        grace: float = 2.0,
        fail: Iterable[str] = (),
        hold: bool = False,
        hold_final: bool = False,
        present: frozenset[QueueKind] = ALL,
    ) -> None:
        self.job = Job(id=uuid4(), workflow="w", ttl=timedelta(seconds=60), queues=ALL)
        self.tracker: JobTracker[str] = JobTracker(self.job, auto_disconnect=auto_disconnect, grace=grace)
        self.fail = set(fail)
        self.hold = hold
        self.hold_final = hold_final
        self.now = 100.0
        self.outstanding: Deliver | None = None
        self.sent: dict[str, Payload] = {}
        self.bodies: dict[str, bytes] = {}
        self.deliveries: list[tuple[Callback, Payload]] = []
        #: Final statuses taken from results, delivered to on_status (labels, ``S<seq>``).
        self.final_statuses: list[str] = []
        #: Every callback call in order, final statuses included.
        self.calls: list[tuple[Callback, Payload]] = []
        self.acked: list[str] = []
        self.requeued: list[str] = []
        self.consumed: list[frozenset[QueueKind]] = []
        self.stopped: list[frozenset[QueueKind]] = []
        self.deleted: list[frozenset[QueueKind]] = []
        self.records: list[dict[str, Any]] = []
        self.wakes: list[float] = []
        self.finishes: list[Finish] = []
        self._times_sent: Counter[str] = Counter()
        self.run(self.tracker.consume(present))

    # --- what happened ---------------------------------------------------------------------

    @property
    def delivered(self) -> list[str]:
        return [label(payload) for _, payload in self.deliveries]

    @property
    def order(self) -> list[str]:
        return [label(payload) for _, payload in self.calls]

    @property
    def finish(self) -> Finish:
        assert len(self.finishes) == 1, self.finishes
        return self.finishes[0]

    # --- inputs ----------------------------------------------------------------------------

    def message(self, text: str) -> Payload:
        match = LABEL.fullmatch(text)
        assert match is not None, text
        attempt = int(match["attempt"] or 1)
        seq = int(match["seq"] or 0)
        if match["kind"] in "sS":  # S: a final status message, as workers of Ebb 0.2 sent
            status = JobStatus.RUNNING if match["kind"] == "s" else JobStatus.SUCCEEDED
            return StatusUpdate(self.job.id, status, seq, self.now, attempt)
        if match["kind"] == "p":
            return ProgressUpdate(self.job.id, 0.5, f"step {seq}", seq, self.now, attempt)
        last = {KIND[item[0]].value: int(item[1:]) for item in (match["last"] or "").split(",") if item}
        return JobResult(
            job_id=self.job.id,
            status=JobStatus.SUCCEEDED,
            output={"n": 42},
            last_seq=last,
            at=self.now,
            attempt=attempt,
        )

    def send(self, *texts: str, at: float | None = None) -> None:
        for text in texts:
            payload = self.message(text)
            base = label(payload)
            token = base + "'" * self._times_sent[base]
            self._times_sent[base] += 1
            self.sent[token] = payload
            self.send_raw(KIND[text[0]], encode_message(payload), token=token, at=at)

    def send_raw(
        self,
        kind: QueueKind,
        body: bytes,
        *,
        token: str,
        content_type: str | None = CONTENT_TYPE,
        at: float | None = None,
    ) -> None:
        self.now = self.now if at is None else at
        self.bodies[token] = body
        self.run(self.tracker.received(kind, body, content_type, token, self.now))

    def tick(self, at: float) -> None:
        self.now = at
        self.run(self.tracker.tick(at))

    def release(self) -> None:
        """The outstanding callback returns (or raises)."""
        assert self.outstanding is not None, "no callback is running"
        error = self._call(self.outstanding)
        self.outstanding = None
        self.run(self.tracker.delivered(error, self.now))

    def disconnect(self, delete: bool | None, at: float | None = None) -> None:
        self.now = self.now if at is None else at
        self.run(self.tracker.disconnect(delete, self.now))

    def reconnect(self, present: frozenset[QueueKind] = ALL) -> None:
        self.tracker.connection_lost()
        self.run(self.tracker.consume(present))

    # --- the transport ---------------------------------------------------------------------

    def _call(self, action: Deliver) -> Exception | None:
        name = label(action.payload)
        return RuntimeError(f"{name} failed") if name in self.fail else None

    def _settle(self, into: list[str], token: str) -> None:
        # Settling a delivery tag twice is a channel error in AMQP: it would hit every job.
        assert token not in self.acked + self.requeued, f"{token} settled twice"
        into.append(token)

    def run(self, actions: list[Action]) -> None:
        todo = deque(actions)
        while todo:
            action = todo.popleft()
            if isinstance(action, Deliver):
                assert self.outstanding is None, f"{label(action.payload)} while a callback still runs"
                self.calls.append((action.callback, action.payload))
                from_result = (
                    isinstance(action.payload, StatusUpdate)
                    and action.payload.status in TERMINAL_STATUSES
                    and action.payload not in self.sent.values()
                )
                if from_result:
                    assert action.callback is Callback.ON_STATUS, action
                    self.final_statuses.append(label(action.payload))
                else:
                    self.deliveries.append((action.callback, action.payload))
                if self.hold if not from_result else self.hold_final:
                    self.outstanding = action
                else:
                    todo.extendleft(reversed(self.tracker.delivered(self._call(action), self.now)))
            elif isinstance(action, Ack):
                self._settle(self.acked, action.token)
            elif isinstance(action, Requeue):
                self._settle(self.requeued, action.token)
            elif isinstance(action, Consume):
                self.consumed.append(action.kinds)
            elif isinstance(action, StopConsuming):
                self.stopped.append(action.kinds)
            elif isinstance(action, DeleteQueues):
                self.deleted.append(action.kinds)
            elif isinstance(action, Record):
                self.records.append(action.fields)
            elif isinstance(action, WakeAt):
                self.wakes.append(action.at)
            else:
                assert isinstance(action, Finish)
                self.finishes.append(action)


def callback_error(finish: Finish) -> CallbackError:
    assert isinstance(finish.error, CallbackError), finish.error
    return finish.error


# --- order ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arrivals",
    [
        ["r"],
        ["s1", "r(s1)"],
        ["s1", "p1", "p2", "s2", "r(s2,p2)"],
        ["p1", "s1", "p2", "p3", "s2", "r(s2,p3)"],
        ["s1", "s3", "p2", "r(s3,p2)"],  # numbers that skip are still delivered
    ],
)
def test_messages_in_order_are_delivered_in_order_then_the_job_finishes(arrivals: list[str]) -> None:
    d = Driver()
    assert d.consumed == [ALL]
    d.send(*arrivals)
    expected = [text.split("(")[0] for text in arrivals]
    assert d.delivered == expected
    assert [payload for _, payload in d.deliveries] == [d.sent[token] for token in expected]
    assert d.acked == expected
    assert d.finish.result == d.sent["r"]
    assert d.finish.error is None
    assert d.finish.retire


def test_each_message_goes_to_its_callback() -> None:
    d = Driver()
    d.send("s1", "p1", "r(s1,p1)")
    assert [callback for callback, _ in d.deliveries] == [
        Callback.ON_STATUS,
        Callback.ON_PROGRESS,
        Callback.ON_FINISHED,
    ]


def test_a_message_without_a_content_type_is_accepted() -> None:
    d = Driver()
    d.send_raw(QueueKind.PROGRESS, encode_message(d.message("p1")), token="p1", content_type=None)
    assert d.delivered == ["p1"]
    assert d.acked == ["p1"]


@pytest.mark.parametrize(
    ("arrivals", "delivered"),
    [
        (["r(p1)", "p1"], ["p1", "r"]),
        (["r(p2)", "p1", "p2"], ["p1", "p2", "r"]),
        (["s1", "r(s1,p1)", "p1"], ["s1", "p1", "r"]),
        (["p1", "r(s2,p2)", "s1", "p2", "s2"], ["p1", "s1", "p2", "s2", "r"]),
        (["s1", "s2", "r(s2,p1)", "p1"], ["s1", "s2", "p1", "r"]),
    ],
)
def test_a_result_that_overtook_its_messages_waits_for_them(
    arrivals: list[str], delivered: list[str]
) -> None:
    d = Driver()
    *before, last = arrivals
    d.send(*before)
    assert "r" not in d.delivered
    assert d.finishes == []
    assert d.wakes and set(d.wakes) == {100.0 + 2.0}
    d.send(last)
    assert d.delivered == delivered
    assert sorted(d.acked) == sorted(delivered)
    assert d.finish.result == d.sent["r"]


@pytest.mark.parametrize(("grace", "since"), [(2.0, 100.0), (0.5, 1000.25), (30.0, 5.0)])
def test_a_result_whose_messages_never_come_is_delivered_after_the_grace(grace: float, since: float) -> None:
    d = Driver(grace=grace)
    d.send("p1", "r(p3,s1)", at=since)
    assert d.wakes == [since + grace]
    d.send("p2", at=since + grace / 2)  # one straggler arrives, the others never do
    d.tick(since + grace / 2)
    d.tick(since + grace * 0.99)
    assert d.delivered == ["p1", "p2"]
    assert set(d.wakes) == {since + grace}  # still the same deadline, however often asked
    d.tick(since + grace)
    assert d.delivered == ["p1", "p2", "r"]
    assert d.finish.result == d.sent["r"]
    assert d.deleted == [ALL]


def test_a_grace_that_ends_while_a_callback_runs_delivers_the_result_after_it() -> None:
    d = Driver(hold=True)
    d.send("r(s1,p1)", at=100.0)
    d.send("s1", at=101.0)
    d.tick(103.0)  # due, but on_status is still running
    assert d.delivered == ["s1"]
    d.release()
    assert d.delivered == ["s1"]
    assert d.wakes[-1] == 102.0  # already due: the transport ticks at once
    d.tick(103.0)
    assert d.delivered == ["s1", "r"]
    d.release()
    assert d.finish.result == d.sent["r"]


def test_a_result_does_not_wait_for_a_queue_that_is_not_consumed() -> None:
    d = Driver(present=frozenset({QueueKind.RESULT, QueueKind.STATUS}))
    assert d.consumed == [frozenset({QueueKind.RESULT, QueueKind.STATUS})]
    d.send("s1", "r(s1,p3)")
    assert d.delivered == ["s1", "r"]
    assert d.wakes == []


def test_while_a_callback_runs_later_messages_wait_then_come_in_arrival_order() -> None:
    d = Driver(hold=True)
    d.send("s1")
    d.send("p1", "s2", "r(s2,p2)", "p2")
    assert d.delivered == ["s1"]
    assert d.acked == []
    d.release()
    assert d.delivered == ["s1", "p1"]
    assert d.acked == ["s1"]
    d.release()
    d.release()
    assert d.delivered == ["s1", "p1", "s2", "p2"]
    d.release()
    assert d.delivered == ["s1", "p1", "s2", "p2", "r"]
    assert d.finishes == []  # on_finished has not returned yet
    d.release()
    assert d.acked == ["s1", "p1", "s2", "p2", "r"]
    assert d.finish.result == d.sent["r"]


# --- duplicates and attempts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrivals", "delivered", "acked"),
    [
        (["s1", "s1", "p1", "p1", "r(s1,p1)"], ["s1", "p1", "r"], ["s1", "s1'", "p1", "p1'", "r"]),
        (["p1", "p2", "p1", "p2", "r(p2)"], ["p1", "p2", "r"], ["p1", "p2", "p1'", "p2'", "r"]),
        (["p1@2", "p1@2", "r(p1)@2"], ["p1@2", "r@2"], ["p1@2", "p1@2'", "r@2"]),
    ],
)
def test_a_message_that_comes_again_is_acked_and_not_delivered_again(
    arrivals: list[str], delivered: list[str], acked: list[str]
) -> None:
    d = Driver()
    d.send(*arrivals)
    assert d.delivered == delivered
    assert d.acked == acked


@pytest.mark.parametrize(
    ("arrivals", "delivered"),
    [
        (["p1", "p2", "p1@2", "p3", "s1", "r(p1)@2"], ["p1", "p2", "p1@2", "r@2"]),
        (["s1", "s1@3", "s2@2", "p1@2", "p1@3", "r(s1,p1)@3"], ["s1", "s1@3", "p1@3", "r@3"]),
    ],
)
def test_messages_of_an_earlier_attempt_are_dropped_once_a_later_one_started(
    arrivals: list[str], delivered: list[str]
) -> None:
    d = Driver()
    d.send(*arrivals)
    assert d.delivered == delivered
    assert sorted(d.acked) == sorted(d.sent)  # the dropped ones too
    assert d.finish.result == d.sent[delivered[-1]]


def test_a_later_attempt_starts_its_numbering_again() -> None:
    d = Driver()
    d.send("s1", "p1", "p2", "p3", "s1@2", "p1@2", "p2@2", "r(s1,p2)@2")
    assert d.delivered == ["s1", "p1", "p2", "p3", "s1@2", "p1@2", "p2@2", "r@2"]
    assert [p.attempt for _, p in d.deliveries] == [1, 1, 1, 1, 2, 2, 2, 2]


def test_a_later_attempts_result_waits_for_that_attempts_messages_seen_so_far() -> None:
    d = Driver()
    d.send("p1", "p2", "p1@2", "r(p3)@2")
    assert d.delivered == ["p1", "p2", "p1@2"]  # p2 of attempt 1 does not count for attempt 2
    d.send("p2@2", "p3@2")
    assert d.delivered == ["p1", "p2", "p1@2", "p2@2", "p3@2", "r@2"]


def test_the_result_of_a_rerun_job_waits_for_the_new_attempts_messages() -> None:
    d = Driver()
    d.send("s1", "p1", "r(s1,p1)@2")  # the worker died after p1; attempt 2 sent s1@2, p1@2, result
    assert d.delivered == ["s1", "p1"]
    d.send("s1@2", "p1@2")
    assert d.delivered == ["s1", "p1", "s1@2", "p1@2", "r@2"]


@pytest.mark.parametrize(
    ("auto_disconnect", "arrivals", "first"),
    [
        (False, ["r", "r"], "r"),  # redelivered after it was handled, the job still connected
        (True, ["r(p1)", "r(p1)", "p1"], "r"),  # redelivered while the first waits for p1
        (False, ["r", "r@2"], "r"),  # a re-run job's second result: the first counts
    ],
)
def test_a_second_result_is_acked_and_ignored(auto_disconnect: bool, arrivals: list[str], first: str) -> None:
    d = Driver(auto_disconnect=auto_disconnect)
    d.send(*arrivals)
    assert d.delivered.count("r") + d.delivered.count("r@2") == 1
    assert sorted(d.acked) == sorted(d.sent)
    assert d.finish.result == d.sent[first]


# --- malformed messages ---------------------------------------------------------------------

Malformed = Callable[[Driver, QueueKind], tuple[bytes, str | None]]


def good(d: Driver, kind: QueueKind) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(d.message("r" if kind is QueueKind.RESULT else "p1"))
    return data


MALFORMED: dict[str, Malformed] = {
    "not JSON": lambda d, kind: (b"{not json", CONTENT_TYPE),
    "not UTF-8": lambda d, kind: (b"\xff\xfe", CONTENT_TYPE),
    "wrong version": lambda d, kind: (encode({**good(d, kind), "v": 2}), CONTENT_TYPE),
    "wrong type": lambda d, kind: (encode({**good(d, kind), "type": "task"}), CONTENT_TYPE),
    "wrong job id": lambda d, kind: (encode({**good(d, kind), "job_id": str(uuid4())}), CONTENT_TYPE),
    "wrong content type": lambda d, kind: (encode(good(d, kind)), "application/x-python-serialize"),
    "missing field": lambda d, kind: (encode({k: v for k, v in good(d, kind).items() if k != "at"}), None),
}


@pytest.mark.parametrize("kind", [QueueKind.PROGRESS, QueueKind.RESULT])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_message_is_acked_and_dropped_and_later_ones_still_arrive(
    case: str, kind: QueueKind
) -> None:
    d = Driver()
    body, content_type = MALFORMED[case](d, kind)
    d.send_raw(kind, body, token="bad", content_type=content_type)
    assert d.acked == ["bad"]
    assert d.deliveries == []
    assert d.finishes == []
    d.send("p1", "r(p1)")
    assert d.delivered == ["p1", "r"]
    assert d.acked == ["bad", "p1", "r"]
    assert d.finish.error is None


def test_a_malformed_message_is_acked_at_once_even_while_a_callback_runs() -> None:
    d = Driver(hold=True)
    d.send("s1")
    d.send_raw(QueueKind.STATUS, b"[]", token="bad")
    assert d.acked == ["bad"]
    d.release()
    assert d.acked == ["bad", "s1"]


# --- raising callbacks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "callback", "cause"),
    [
        ({"p1"}, "on_progress", "p1 failed"),
        ({"s1"}, "on_status", "s1 failed"),
        ({"p2", "s1"}, "on_status", "s1 failed"),  # the first one that raised is reported
    ],
)
def test_a_raising_progress_or_status_callback_is_reported_with_the_result(
    fail: set[str], callback: str, cause: str
) -> None:
    d = Driver(fail=fail)
    d.send("s1", "p1", "p2", "r(s1,p2)")
    assert d.delivered == ["s1", "p1", "p2", "r"]
    assert d.acked == ["s1", "p1", "p2", "r"]
    assert d.finish.result == d.sent["r"]
    error = callback_error(d.finish)
    assert error.callback == callback
    assert error.result == d.sent["r"]
    assert str(error.__cause__) == cause
    assert d.deleted == [ALL]
    assert d.finish.retire


@pytest.mark.parametrize("auto_disconnect", [True, False])
def test_a_raising_on_finished_puts_the_result_back_and_keeps_the_queues(auto_disconnect: bool) -> None:
    d = Driver(auto_disconnect=auto_disconnect, fail={"r"})
    d.send("s1", "p1", "r(s1,p1)", at=150.0)
    assert d.delivered == ["s1", "p1", "r"]
    assert d.acked == ["s1", "p1"]
    assert d.requeued == ["r"]
    assert d.stopped == [ALL]
    assert d.deleted == []
    assert d.records == [{"queues_last_in_use": 150.0}]  # not marked delivered
    assert d.finish.retire
    assert d.finish.result == d.sent["r"]
    error = callback_error(d.finish)
    assert error.callback == "on_finished"
    assert error.result == d.sent["r"]
    assert str(error.__cause__) == "r failed"


@pytest.mark.parametrize(
    ("fail", "acked", "requeued", "deleted"),
    [
        ((), ["s1", "r", "s2"], [], [ALL]),  # their queues are deleted
        ({"r"}, ["s1"], ["r", "s2"], []),  # they wait in their queues with the result
    ],
)
def test_messages_that_arrive_while_on_finished_runs(
    fail: set[str], acked: list[str], requeued: list[str], deleted: list[frozenset[QueueKind]]
) -> None:
    d = Driver(hold=True, fail=fail)
    d.send("s1", "r(s1)")
    d.release()
    assert d.delivered == ["s1", "r"]
    d.send("s2")
    d.release()
    assert d.delivered == ["s1", "r"]
    assert d.acked == acked
    assert d.requeued == requeued
    assert d.deleted == deleted


# --- cleanup after the result ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("auto_disconnect", "deleted", "retire"),
    [(True, ALL, True), (False, RESULT_ONLY, False)],
)
def test_after_the_result_auto_disconnect_decides_which_queues_go(
    auto_disconnect: bool, deleted: frozenset[QueueKind], retire: bool
) -> None:
    d = Driver(auto_disconnect=auto_disconnect)
    d.send("s1", "p1", "r(s1,p1)", at=160.0)
    assert d.stopped == [deleted]
    assert d.deleted == [deleted]
    assert d.finish.retire is retire
    assert d.finish.size == len(d.bodies["r"])
    assert d.records[-1] == {
        "status": "SUCCEEDED",
        "finished_at": d.finish.result.at if d.finish.result else None,
        "result_delivered": True,
        "result_delivered_at": 160.0,
        "queues_last_in_use": 160.0,
        # the audit's sign that the caller, not the broker, removed every queue
        **({"queues_deleted_at": 160.0} if auto_disconnect else {}),
    }


def test_without_auto_disconnect_the_job_keeps_listening_after_its_result() -> None:
    d = Driver(auto_disconnect=False)
    d.send("s1", "r(s1)", "s2", "p1", "r")
    assert d.delivered == ["s1", "r", "s2", "p1"]
    assert d.acked == ["s1", "r", "s2", "p1", "r'"]
    d.reconnect(present=ALL)  # its deletion still pending: the handled result queue is not read again
    assert d.consumed[-1] == UPDATES
    d.reconnect(present=UPDATES)  # the result queue is gone now, and that is fine
    assert d.consumed[-1] == UPDATES
    assert d.finish.error is None


# --- reconnects -----------------------------------------------------------------------------


def test_after_a_lost_connection_consuming_resumes_and_seen_messages_are_not_delivered_again() -> None:
    d = Driver()
    d.send("s1", "p1", "r(s1,p2)")  # the result waits for p2
    assert d.delivered == ["s1", "p1"]
    d.reconnect()
    assert d.consumed == [ALL, ALL]
    d.tick(200.0)  # the old channel's result is gone with it: nothing to deliver
    assert d.delivered == ["s1", "p1"]
    d.send("s1", "p1", "r(s1,p2)", "p2")  # the broker delivers again whatever was unacked
    assert d.delivered == ["s1", "p1", "p2", "r"]
    assert d.acked == ["s1", "p1", "s1'", "p1'", "p2", "r'"]
    assert "r" not in d.requeued  # the first token died with its channel
    assert d.finish.result == d.sent["r'"]


def test_a_result_whose_callback_ran_through_a_lost_connection_finishes_once() -> None:
    d = Driver(hold=True)
    d.send("s1", "r(s1)")
    d.release()  # s1's callback returns; on_finished starts and is still running...
    assert d.delivered == ["s1", "r"]
    d.tracker.connection_lost()  # ...when the connection goes (the asyncio client's thread runs on)
    d.release()
    assert d.finish.result == d.sent["r"], "on_finished ran: wait() must end with its result"
    d.run(d.tracker.consume(ALL))  # after the reconnect: finished, nothing consumed again
    d.send("r(s1)")  # the broker redelivers the unacked result
    assert d.delivered == ["s1", "r"]


@pytest.mark.parametrize("present", [frozenset(), UPDATES, frozenset({QueueKind.STATUS})])
def test_without_its_result_queue_the_job_ends_with_queues_expired(present: frozenset[QueueKind]) -> None:
    d = Driver(present=present)
    assert d.consumed == []
    assert d.finish.result is None
    assert isinstance(d.finish.error, JobQueuesExpiredError)
    assert d.finish.error.job_id == d.job.id
    assert d.finish.retire


def test_a_result_queue_that_vanished_while_disconnected_ends_the_job() -> None:
    d = Driver()
    d.send("s1", "p1")
    d.reconnect(present=UPDATES)
    assert d.consumed == [ALL]
    assert isinstance(d.finish.error, JobQueuesExpiredError)


# --- disconnect and abandon -----------------------------------------------------------------


@pytest.mark.parametrize(("delete", "deleted"), [(None, []), (False, []), (True, [ALL])])
def test_disconnect_before_the_result(delete: bool | None, deleted: list[frozenset[QueueKind]]) -> None:
    d = Driver()
    d.send("s1", "r(s1,p1)", at=100.0)  # the result waits for p1
    d.disconnect(delete, at=101.0)
    assert d.stopped == [ALL]
    assert d.requeued == ["r"]  # back for a later connect_to_submitted_job
    assert d.acked == ["s1"]
    assert d.deleted == deleted
    assert d.records == [{"queues_last_in_use": 101.0, **({"queues_deleted_at": 101.0} if delete else {})}]
    assert d.finish.result is None
    assert isinstance(d.finish.error, ClientClosedError)
    assert d.finish.retire
    d.tick(110.0)
    assert d.delivered == ["s1"]


@pytest.mark.parametrize(("delete", "deleted"), [(None, [ALL]), (True, [ALL]), (False, [])])
def test_disconnect_after_the_result(delete: bool | None, deleted: list[frozenset[QueueKind]]) -> None:
    d = Driver(auto_disconnect=False)
    d.send("s1", "r(s1)")
    assert d.deleted == [RESULT_ONLY]
    d.disconnect(delete)
    assert d.stopped == [RESULT_ONLY, UPDATES]
    assert d.deleted[1:] == deleted
    assert [f.retire for f in d.finishes] == [False, True]
    assert d.finishes[-1].result == d.sent["r"]
    assert d.finishes[-1].error is None


def test_abandon_before_the_result_ends_wait_with_the_error() -> None:
    d = Driver()
    d.send("s1", "r(s1,p1)")
    error = ClientClosedError("the broker is gone")
    d.run(d.tracker.abandon(error))
    assert d.finish.result is None
    assert d.finish.error is error
    assert d.finish.retire
    d.tick(200.0)  # the result it held is forgotten, not delivered
    assert d.delivered == ["s1"]


@pytest.mark.parametrize(("auto_disconnect", "retired"), [(True, [True]), (False, [False, True])])
def test_abandon_after_the_result_keeps_the_result(auto_disconnect: bool, retired: list[bool]) -> None:
    d = Driver(auto_disconnect=auto_disconnect)
    d.send("r")
    error: EbbError = ClientClosedError("the client was closed")
    d.run(d.tracker.abandon(error))
    assert [f.retire for f in d.finishes] == retired
    assert all(f.result == d.sent["r"] and f.error is None for f in d.finishes)


def test_abandon_after_the_queues_expired_adds_nothing() -> None:
    d = Driver(present=UPDATES)
    d.run(d.tracker.abandon(ClientClosedError("closed")))
    assert isinstance(d.finish.error, JobQueuesExpiredError)


# --- a consumer cancelled by the broker ------------------------------------------------------


def cancelled_after_s1(kind: QueueKind) -> Driver:
    """A job that got status 1, then RabbitMQ cancelled the consumer of its ``kind`` queue."""
    d = Driver()
    d.send("s1")
    actions = d.tracker.consumer_cancelled(kind)
    assert actions is not None
    d.run(actions)
    return d


def test_a_cancelled_result_consumer_whose_queue_is_gone_ends_the_job_and_its_other_queues() -> None:
    d = cancelled_after_s1(QueueKind.RESULT)
    assert d.stopped == [UPDATES]  # the others stop, for the probe to decide
    d.run(d.tracker.consume(frozenset(), CANCELLED_VANISHED))  # the probe: the result queue is gone
    assert d.deleted == [UPDATES]
    assert isinstance(d.finish.error, JobQueuesExpiredError)
    assert "RabbitMQ cancelled the consumer" in str(d.finish.error)
    assert d.tracker.consumer_cancelled(QueueKind.STATUS) is None  # its own delete: nothing more


def test_a_cancelled_consumer_whose_queues_are_back_is_consumed_again_and_the_result_comes_once() -> None:
    d = cancelled_after_s1(QueueKind.PROGRESS)
    assert d.stopped == [frozenset({QueueKind.RESULT, QueueKind.STATUS})]
    d.run(d.tracker.consume(ALL, CANCELLED_VANISHED))
    assert d.consumed == [ALL, ALL]
    d.send("r(s1)")
    assert d.delivered == ["s1", "r"] and d.finish.result == d.sent["r"]


def test_a_consumer_cancel_after_the_job_finished_is_nothing() -> None:
    d = Driver()
    d.send("r")
    assert d.tracker.consumer_cancelled(QueueKind.RESULT) is None


# --- a result the worker gave up on (the registry says so) -----------------------------------


def test_a_result_the_registry_says_was_lost_ends_wait_and_deletes_the_queues() -> None:
    d = Driver()
    d.send("s1", "p1")
    lost = "result not delivered: node ebb-n2 down past EBB_RESULT_RETRY"
    d.run(d.tracker.result_lost("SUCCEEDED", lost, False, now=50.0))
    assert d.stopped == [ALL] and d.deleted == [ALL]
    assert d.records == [{"queues_deleted_at": 50.0}]
    assert isinstance(d.finish.error, JobResultLostError) and d.finish.result is None
    assert d.finish.error.status == "SUCCEEDED" and lost in str(d.finish.error)
    assert d.finish.retire
    d.run(d.tracker.result_lost("SUCCEEDED", lost, False, now=60.0))  # asked again: nothing more
    assert len(d.finishes) == 1


@pytest.mark.parametrize(
    ("before", "lost", "delivered"),
    [
        ("r(s1,p1)", "x", False),  # a result in hand (waiting for its stragglers) decides
        ("s1", None, False),  # nothing lost: the job goes on
        ("s1", "x", True),  # someone took a result: this caller's comes, or its queues are gone
    ],
)
def test_a_result_not_known_lost_keeps_the_wait_going(before: str, lost: str | None, delivered: bool) -> None:
    d = Driver()
    d.send(before)
    d.run(d.tracker.result_lost("SUCCEEDED", lost, delivered, now=50.0))
    assert d.finishes == [] and d.deleted == []


@pytest.mark.parametrize("running", ["s1", "r"])
def test_disconnect_from_inside_a_callback_settles_its_message_once(running: str) -> None:
    """disconnect_from_submitted_job may be called from one of the job's own callbacks."""
    d = Driver(hold=True)
    d.send(running)
    d.disconnect(None)  # what disconnect_from_submitted_job does when a callback calls it
    assert d.requeued == []  # the running callback's message is not put back under it
    d.release()  # the callback returns: its message was handled, and is settled once
    assert d.acked == [running]
    assert len(d.finishes) == 1


# --- finished jobs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_jobs", "max_bytes", "sizes", "kept"),
    [
        (3, 100, [10, 10, 10], "abc"),  # at both limits: all kept
        (2, 100, [10, 10, 10], "bc"),
        (1, 100, [10, 10, 10], "c"),
        (10, 25, [10, 10, 10], "bc"),
        (10, 100, [60, 30, 50], "bc"),
        (10, 100, [90, 5, 5, 5], "bcd"),
    ],
)
def test_finished_jobs_keep_at_most_max_jobs_and_max_bytes_oldest_forgotten_first(
    max_jobs: int, max_bytes: int, sizes: list[int], kept: str
) -> None:
    jobs = FinishedJobs(max_jobs, max_bytes)
    keys = "abcdefgh"[: len(sizes)]
    for key, size in zip(keys, sizes, strict=True):
        jobs.add(key, f"outcome {key}", size)
    assert [key for key in keys if jobs.get(key) is not None] == list(kept)
    assert all(jobs.get(key) == f"outcome {key}" for key in kept)
    assert len(jobs) == len(kept)
    assert jobs.bytes == sum(size for key, size in zip(keys, sizes, strict=True) if key in kept)


def test_finished_jobs_count_a_job_added_again_once_and_as_the_newest() -> None:
    jobs = FinishedJobs(max_jobs=2, max_bytes=100)
    jobs.add("a", "first", 40)
    jobs.add("b", "b", 10)
    jobs.add("a", "second", 30)
    assert (len(jobs), jobs.bytes, jobs.get("a")) == (2, 40, "second")
    jobs.add("c", "c", 10)
    assert jobs.get("b") is None
    assert jobs.get("a") == "second"
    assert jobs.pop("a") == "second"
    assert jobs.pop("a") is None
    assert (len(jobs), jobs.bytes) == (1, 10)


# --- the final status, taken from the result ------------------------------------------------


@pytest.mark.parametrize(
    ("arrivals", "order"),
    [
        (["r"], ["S1", "r"]),  # refused before it ran: no RUNNING, the final status still comes
        (["s1", "p1", "r(s1,p1)"], ["s1", "p1", "S2", "r"]),
        (["r(s1)", "s1"], ["s1", "S2", "r"]),  # a result that overtook RUNNING waits for it first
        (["s1", "s1@2", "r(s1)@2"], ["s1", "s1@2", "S2@2", "r@2"]),  # of the attempt that ended
    ],
)
def test_on_status_hears_the_final_status_from_the_result_just_before_on_finished(
    arrivals: list[str], order: list[str]
) -> None:
    """Workers send no final status message: one message less per job for RabbitMQ."""
    d = Driver()
    d.send(*arrivals)
    assert d.order == order
    final = next(p for c, p in d.calls if c is Callback.ON_STATUS and label(p) == order[-2])
    assert isinstance(final, StatusUpdate)
    result = d.sent["r" + order[-1][1:]]
    assert (final.status, final.at, final.attempt) == (JobStatus.SUCCEEDED, result.at, result.attempt)
    assert d.finish.result is not None and d.finish.error is None
    assert sorted(d.acked) == sorted(t for t in d.sent)  # every message settled once, nothing for S


def test_without_a_status_queue_no_final_status_is_made_up() -> None:
    d = Driver(present=frozenset({QueueKind.RESULT, QueueKind.PROGRESS}))
    d.send("p1", "r(p1)")
    assert d.order == ["p1", "r"]


def test_a_final_status_message_from_an_earlier_worker_is_not_heard_twice() -> None:
    d = Driver()
    d.send("s1", "S2", "r(s2)")
    assert d.order == ["s1", "S2", "r"] and d.final_statuses == []


def test_a_raising_on_status_for_the_final_status_is_reported_with_the_result() -> None:
    d = Driver(fail={"S2"})
    d.send("s1", "r(s1)")
    error = callback_error(d.finish)
    assert error.callback == "on_status" and error.result == d.sent["r"]
    assert d.acked == ["s1", "r"] and d.deleted == [ALL]


def test_disconnect_from_inside_the_final_status_puts_the_result_back_once() -> None:
    d = Driver(hold_final=True)
    d.send("s1", "r(s1)")
    assert d.order == ["s1", "S2"]
    d.disconnect(None)  # on_status calls disconnect_from_submitted_job
    d.release()
    assert d.requeued == ["r"] and d.acked == ["s1"]
    assert "r" not in d.order and len(d.finishes) == 1
