"""The caller's life without a broker: scripted scenarios through ``CallerCore``, for both clients.

Each scenario runs once with the sync client's watches and once with the asyncio client's (their
``_new_watch``): the decisions are the core's, so the two must come out alike. The last tests
hold the two transports side by side and check that they ask the core the same things, method
for method: a decision added to one client and not the other fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ebb import aio, client
from ebb.broker_replies import Present, Probe, Unreachable
from ebb.caller import BURST_JOBS, BURST_SECONDS, CallerCore, Watch
from ebb.config import Settings
from ebb.contract import JobResult, JobStatus, QueueKind, TaskRequest, queue_name
from ebb.core import CANCELLED_VANISHED, Consume, DeleteQueues, Finish, Record, StopConsuming
from ebb.errors import (
    BrokerBlockedError,
    BrokerUnavailableError,
    ClientClosedError,
    InvalidArgumentError,
    JobQueuesExpiredError,
    JobQueuesUnavailableError,
)
from ebb.records import NOT_SUBMITTED, SUBMITTED, JobRecord

TRANSPORTS: dict[str, Callable[..., Any]] = {"sync": client._new_watch, "async": aio._new_watch}
ALL = frozenset(QueueKind)
SDK = Path(__file__).resolve().parent.parent / "sdk" / "ebb"


@pytest.fixture(params=sorted(TRANSPORTS))
def caller(request: pytest.FixtureRequest) -> CallerCore[Any, str]:
    settings = Settings.from_env()
    return CallerCore(settings, TRANSPORTS[request.param])


def submitted(caller: CallerCore[Any, str], **options: Any) -> tuple[Watch, TaskRequest, dict[str, Any]]:
    plan = caller.plan_submit(
        "demo.echo",
        {"x": 1},
        on_finished=None,
        on_progress=options.get("on_progress"),
        on_status=None,
        auto_disconnect=True,
        ttl=options.get("ttl", 60),
        reference=None,
        job_timeout=None,
        updates=options.get("updates", False),
    )
    return caller.submission(plan, plan.params, now=1000.0)


def running(caller: CallerCore[Any, str], **options: Any) -> Watch:
    """A job submitted, its task out and confirmed: connected."""
    watch, _, _ = submitted(caller, **options)
    caller.publishing(watch)
    caller.task_confirmed(watch)
    return watch


def probes_of(job_id: uuid.UUID, **found: Probe) -> dict[str, Probe]:
    """Probe answers for a job's queues, by kind name (missing kinds: the queue is gone)."""
    return {queue_name(job_id, kind): found.get(kind.value) for kind in QueueKind}


def result_of(job_id: uuid.UUID) -> JobResult:
    return JobResult(job_id=job_id, status=JobStatus.SUCCEEDED, output={"ok": True}, at=1.0)


# --- submit ---------------------------------------------------------------------------------


def test_a_submit_is_recorded_submitted_before_its_task_and_connected_once_confirmed(
    caller: CallerCore[Any, str],
) -> None:
    watch, request, record = submitted(caller, updates=True)
    assert record["status"] == SUBMITTED and record["result_delivered"] is False
    assert request.job_id == watch.job.id and request.queues == ALL
    assert watch.job.id not in caller.watches  # not before the broker took the task
    caller.publishing(watch)
    assert caller.task_confirmed(watch) == [Consume(ALL)]
    assert caller.known(watch.job.id) is watch


# Who hears what, and what the record says, for every way a submit can fail: a row per way.
FAILED_SUBMITS = [
    # (what happened, published?, error raised, caller gets a job id?, record NOT_SUBMITTED?)
    ("the connection was down before anything went out", False, BrokerUnavailableError("down"), False, True),
    ("the client was closed before anything went out", False, ClientClosedError("closed"), False, True),
    ("the task went out, then the connection broke", True, BrokerUnavailableError("lost"), True, False),
    ("the task went out, then the client failed for good", True, ClientClosedError("gone"), True, False),
    ("the task went out, no confirm within the bound", True, "unconfirmed", True, False),
    ("the task went out and RabbitMQ refused it", True, "refused", False, True),
]


@pytest.mark.parametrize(
    ("_what", "published", "raised", "gets_job_id", "not_submitted"),
    FAILED_SUBMITS,
    ids=[row[0] for row in FAILED_SUBMITS],
)
def test_a_failed_submit_is_recorded_not_submitted_only_when_its_task_certainly_never_ran(
    caller: CallerCore[Any, str],
    _what: str,
    published: bool,
    raised: Any,
    gets_job_id: bool,
    not_submitted: bool,
) -> None:
    watch, _, _ = submitted(caller)
    if published:
        caller.publishing(watch)
    if raised == "unconfirmed":
        raised = caller.task_unconfirmed(watch, "the task", "timeout", now=1000.0)
        assert caller.unsettled.job(watch.job.id) == watch.job  # sent again after the reconnect
    elif raised == "refused":
        assert caller.task_refused(watch) == [DeleteQueues(watch.job.queues)]
        raised = BrokerUnavailableError("refused")
    error, fields = caller.submit_failed(watch, raised)
    assert (getattr(error, "job_id", None) == watch.job.id) is gets_job_id
    assert (fields == {"status": NOT_SUBMITTED}) is not_submitted
    assert caller.task_confirmed(watch) == []  # a confirm after the caller gave up connects nothing
    assert watch.job.id not in caller.watches


@pytest.mark.parametrize(
    ("probe", "says"),
    [
        (None, "does not exist"),
        (Unreachable("rabbit@n2"), "rabbit@n2"),
        (Present(0, 1), "refused (nacked)"),
        ("unprobed", "refused (nacked)"),
    ],
    ids=["task queue gone", "task queue's node down", "refused", "no probe possible"],
)
def test_a_refused_task_is_explained_by_the_task_queues_probe(
    caller: CallerCore[Any, str], probe: Any, says: str
) -> None:
    watch, _, _ = submitted(caller)
    caller.publishing(watch)
    caller.task_refused(watch)
    error = caller.refused_error(watch, "nacked", probe)
    assert says in str(error) and str(watch.job.id) in str(error) and error.job_id is None


def test_while_rabbitmq_blocks_the_connection_nothing_is_published_and_the_error_names_the_alarm(
    caller: CallerCore[Any, str],
) -> None:
    assert caller.may_publish() is None
    caller.blocked("low on memory")
    refused = caller.may_publish()
    assert isinstance(refused, BrokerBlockedError) and refused.job_id is None
    assert "low on memory" in str(refused) and refused.reason == "low on memory"
    watch, _, _ = submitted(caller)
    caller.publishing(watch)  # went out just before the block: may run
    late = caller.task_unconfirmed(watch, "the task", "timeout", now=1000.0)
    assert isinstance(late, BrokerBlockedError) and late.job_id == watch.job.id
    caller.unblocked()
    assert caller.may_publish() is None


# --- connect --------------------------------------------------------------------------------


def test_a_second_connect_of_one_job_is_refused_while_the_first_probes_and_after(
    caller: CallerCore[Any, str],
) -> None:
    job_id = uuid.uuid4()
    plan = caller.plan_connect(
        job_id, on_finished=None, on_progress=None, on_status=None, auto_disconnect=True, ttl=None
    )
    caller.begin_connect(job_id)
    with pytest.raises(InvalidArgumentError, match="already connected"):
        caller.begin_connect(job_id)  # the asyncio client's two awaits no longer let it through
    with pytest.raises(InvalidArgumentError):
        caller.known(job_id)  # not known to wait() until its probe answered
    found = caller.connected(
        plan, _job(job_id), timedelta(seconds=60), probes_of(job_id, result=Present(1, 0)), 5.0
    )
    caller.end_connect(job_id)
    assert found is not None
    watch, actions = found
    assert actions == [Consume(frozenset({QueueKind.RESULT})), Record({"queues_last_in_use": 5.0})]
    with pytest.raises(InvalidArgumentError, match="already connected"):
        caller.begin_connect(job_id)
    assert caller.known(job_id) is watch


@pytest.mark.parametrize(
    ("found", "outcome"),
    [
        ({"result": Present(0, 0)}, "connected"),
        ({"progress": Present(0, 0)}, "expired"),
        ({"result": Unreachable("rabbit@n1")}, "unavailable"),
    ],
    ids=["result queue there", "result queue gone", "result queue's node down"],
)
def test_what_a_connects_probe_found_decides_it(
    caller: CallerCore[Any, str], found: dict[str, Probe], outcome: str
) -> None:
    job_id = uuid.uuid4()
    plan = caller.plan_connect(
        job_id, on_finished=None, on_progress=print, on_status=None, auto_disconnect=True, ttl=None
    )
    probes = probes_of(job_id, **found)
    if outcome == "unavailable":
        with pytest.raises(JobQueuesUnavailableError, match="rabbit@n1"):
            caller.connected(plan, _job(job_id), None, probes, 5.0)
        return
    connected = caller.connected(plan, _job(job_id), None, probes, 5.0)
    assert (connected is not None) is (outcome == "connected")


def test_a_job_read_with_events_wants_every_queue_it_was_submitted_with(caller: CallerCore[Any, str]) -> None:
    job = _job(uuid.uuid4())
    for_events = caller.plan_connect(
        job,
        on_finished=None,
        on_progress=None,
        on_status=None,
        auto_disconnect=True,
        ttl=None,
        for_events=True,
    )
    plain = caller.plan_connect(
        job, on_finished=None, on_progress=None, on_status=None, auto_disconnect=True, ttl=None
    )
    assert for_events.wanted == ALL and plain.wanted == {QueueKind.RESULT}


# --- the connection: resumed, cancelled -------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ({"result": Present(0, 0), "progress": Present(0, 0), "status": Present(0, 0)}, "consume"),
        ({"progress": Present(0, 0)}, JobQueuesExpiredError),
        ({"result": Unreachable(None)}, JobQueuesUnavailableError),
    ],
    ids=["queues back", "result queue gone", "node down"],
)
def test_after_a_reconnect_each_job_goes_on_or_ends_with_the_reason(
    caller: CallerCore[Any, str], found: dict[str, Probe], expected: Any
) -> None:
    watch = running(caller, updates=True)
    caller.connection_lost()
    assert caller.resumable() == [watch]
    assert caller.queue_names([watch]) == {queue_name(watch.job.id, k) for k in ALL}
    actions = caller.probed(watch, probes_of(watch.job.id, **found))
    if expected == "consume":
        assert actions == [Consume(ALL)]
        return
    finish = actions[-1]
    assert isinstance(finish, Finish) and isinstance(finish.error, expected)


def test_a_consumer_rabbitmq_cancelled_stops_the_others_and_only_the_current_one_counts(
    caller: CallerCore[Any, str],
) -> None:
    watch = running(caller, updates=True)
    watch.consumers.update(
        {QueueKind.RESULT: "ebb.1", QueueKind.PROGRESS: "ebb.2", QueueKind.STATUS: "ebb.3"}
    )
    actions = caller.consumer_cancelled(watch, QueueKind.PROGRESS, "ebb.2")
    assert actions == [StopConsuming(frozenset({QueueKind.RESULT, QueueKind.STATUS}))]
    assert QueueKind.PROGRESS not in watch.consumers
    gone = caller.probed(watch, probes_of(watch.job.id, status=Present(0, 0)), CANCELLED_VANISHED)
    finish = gone[-1]
    assert isinstance(finish, Finish) and isinstance(finish.error, JobQueuesExpiredError)
    assert "RabbitMQ cancelled the consumer" in str(finish.error)
    assert caller.consumer_cancelled(watch, QueueKind.STATUS, "ebb.3") is None  # nothing left to hear


# --- outcomes, the end -------------------------------------------------------------------------


def test_a_finished_job_is_found_by_wait_and_its_record_batched_until_the_burst_ends(
    caller: CallerCore[Any, str],
) -> None:
    watch = running(caller)
    caller.record(watch, Record({"result_delivered": True}))
    result = result_of(watch.job.id)
    caller.finish(watch, Finish(result, None, retire=True, size=10))
    assert watch.job.id not in caller.watches and caller.known(watch.job.id) is watch
    assert caller.outcome(watch) == result
    records, signal = caller.take_burst()
    assert records == {watch.job.id: (timedelta(seconds=60), {"result_delivered": True})} and signal == [
        watch
    ]
    assert caller.take_burst() == ({}, [])


def test_a_burst_is_due_once_it_holds_a_thousand_jobs_or_is_a_tenth_of_a_second_old(
    caller: CallerCore[Any, str],
) -> None:
    """A flood of results must not keep one burst open: its waiters would wake only at the end
    (bench_burst.py saw one burst hold 692 of 1,000 jobs released at once, for seconds)."""
    assert not caller.burst_due(now=5.0)  # empty: nothing to end
    first = running(caller)
    caller.finish(first, Finish(result_of(first.job.id), None, retire=True, size=10))
    assert not caller.burst_due(now=5.0)  # its age counts from here
    assert not caller.burst_due(now=5.0 + BURST_SECONDS / 2)
    assert caller.burst_due(now=5.0 + 1.01 * BURST_SECONDS)
    caller.take_burst()
    assert not caller.burst_due(now=9.0)  # a new burst: nothing in it yet
    for _ in range(BURST_JOBS - 1):
        watch = running(caller)
        caller.record(watch, Record({"result_delivered": True}))
        assert not caller.burst_due(now=9.0)
    watch = running(caller)
    caller.record(watch, Record({"result_delivered": True}))
    assert caller.burst_due(now=9.0)  # full, however young
    records, _ = caller.take_burst()
    assert len(records) == BURST_JOBS and not caller.burst_due(now=9.0)


def test_closing_starts_every_unfinished_jobs_ttl_and_ends_its_wait(caller: CallerCore[Any, str]) -> None:
    watch = running(caller)
    [(closed, actions)] = list(caller.close(now=7.0))
    assert closed is watch and actions[0] == Record({"queues_last_in_use": 7.0})
    finish = actions[-1]
    assert isinstance(finish, Finish) and isinstance(finish.error, ClientClosedError)


def test_a_client_that_gave_up_on_the_broker_says_so_without_the_password(
    caller: CallerCore[Any, str],
) -> None:
    running(caller)
    [(_, actions)] = list(caller.failed(ConnectionError("amqp://ebb:s3cret@broker:5672// refused")))
    error = actions[-1].error  # type: ignore[union-attr]
    assert isinstance(error, ClientClosedError) and "s3cret" not in str(error) and "for good" in str(error)


def test_a_delete_cut_off_by_the_connection_is_owed_until_done(caller: CallerCore[Any, str]) -> None:
    job_id = uuid.uuid4()
    caller.delete_started(job_id, ALL)
    assert caller.deletes_owed == {job_id: ALL}
    caller.delete_done(job_id)
    assert caller.deletes_owed == {}


def test_the_lost_result_check_runs_every_ten_seconds_and_believes_the_workers_record(
    caller: CallerCore[Any, str],
) -> None:
    watch = running(caller)
    start = watch.lost_checked_at
    assert not caller.lost_check_due(watch, start + 1)
    assert caller.lost_check_due(watch, start + 10) and not caller.lost_check_due(watch, start + 11)
    record = JobRecord.from_hash(watch.job.id, {"status": "SUCCEEDED", "lost": "its result queue expired"})
    actions = caller.result_lost(watch, record, now=9.0)
    assert isinstance(actions[-1], Finish) and "its result queue expired" in str(actions[-1].error)


# --- the two transports, side by side ---------------------------------------------------------


def _core_calls(path: Path) -> dict[str, list[str]]:
    """Per method of the module's client class: what it asks of the core, in source order."""
    tree = ast.parse(path.read_text())
    calls: dict[str, list[str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("JobClient")):
        for method in (n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            asked = [
                node
                for node in ast.walk(method)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "_core"
            ]
            calls[method.name] = [node.attr for node in sorted(asked, key=lambda n: (n.lineno, n.col_offset))]
    return calls


#: What only one transport asks, and why: asyncio collects a burst over several loop turns
#: (``burst_size``), and only it offers ``events()``; its queue deletes time out one by one on a
#: live connection and are tried again (``deletes_owed``), where a failed delete takes the sync
#: client's connection down and its reconnect does them.
ONE_SIDED = {"_burst_settled": ["burst_size"], "events": ["known"], "_delete_owed": ["deletes_owed"]}


def test_both_clients_ask_the_core_the_same_things_method_for_method() -> None:
    sync, asyncio_ = _core_calls(SDK / "client.py"), _core_calls(SDK / "aio.py")
    assert sum(map(len, sync.values())) > 40, "the sync client barely asks the core anything"
    for name in sorted(set(sync) | set(asyncio_)):
        mine, theirs = sync.get(name) or [], asyncio_.get(name) or []
        if mine != theirs:
            assert ONE_SIDED.get(name) in (mine, theirs), f"{name}: sync asks {mine}, async {theirs}"


def test_both_clients_offer_the_same_public_methods_with_the_same_parameters() -> None:
    def public(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    sync, asyncio_ = public(client.JobClient), public(aio.AsyncJobClient)
    only_async = {"start", "events"}  # asyncio's explicit start, and an async iterator of a job's messages
    assert set(asyncio_) - only_async == set(sync)
    for name, parameters in sync.items():
        assert asyncio_[name] == parameters, name


def test_no_registry_field_or_caller_error_text_is_written_in_a_transport() -> None:
    """Registry writes and the errors a caller reads are decided in the core: no transport names a
    record field or builds a caller's error message of its own."""
    fields = re.compile(r'"(status|submitted_at|result_delivered|queues_last_in_use|queues_deleted_at)"\s*:')
    for module in ("client.py", "aio.py"):
        text = (SDK / module).read_text()
        assert not fields.findall(text), f"{module} writes registry fields itself"
        assert "ClientClosedError(f" not in text and "WaitTimeoutError(" not in text, module


def _job(job_id: uuid.UUID) -> Any:
    from ebb.job import Job

    return Job(job_id, "demo.echo", timedelta(seconds=60), ALL)
