"""How the SDK behaves beyond the happy path: TTL choices, callbacks that raise, bad input.

Every test runs with both clients (``any_client`` / ``make_client``), but the one that is about
``JobClient``'s consumer thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from amqp import Message
from kombu.connection import Connection

from ebb import (
    BrokerUnavailableError,
    CallbackError,
    Job,
    JobClient,
    JobFailedError,
    JobQueuesExpiredError,
    JobResult,
    JobStatus,
    ProgressUpdate,
    UnknownWorkflowError,
)
from ebb.config import Settings
from ebb.contract import QueueKind, encode_message
from tests.async_adapter import AsyncClientAsSync
from tests.conftest import AnyClient
from tests.support import ClientProcess, Management, wait_until


def test_reconnect_with_other_ttl_keeps_original_and_never_fails(
    make_client: Callable[[], AnyClient],
    caller_kind: str,
    worker: Path,
    management: Management,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caller = ClientProcess("demo.sleep", {"seconds": 0.3, "steps": 1}, ttl=30, kind=caller_kind)
    job = Job.from_json(caller.job_json)
    caller.kill()
    with make_client() as client, caplog.at_level(logging.WARNING, "ebb.client"):
        client.connect_to_submitted_job(
            job,
            on_finished=lambda j, r: None,
            auto_disconnect_on_result=False,
            auto_cleanup_after_ttl=timedelta(seconds=5),
        )
        assert client.wait(job, timeout=30).status is JobStatus.SUCCEEDED
        assert "event=ttl_not_changed" in caplog.text
        assert str(job.id) in caplog.text
        remaining = management.job_queues(job.id)
        assert set(remaining) == {QueueKind.PROGRESS, QueueKind.STATUS}
        assert all(q["arguments"]["x-expires"] == 30_000 for q in remaining.values())
        client.disconnect_from_submitted_job(job)
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_without_auto_disconnect_progress_and_status_stay_until_disconnect(
    any_client: AnyClient, management: Management
) -> None:
    client = any_client
    job = client.submit_job(
        "demo.sleep",
        {"seconds": 0.2, "steps": 2},
        on_progress=lambda j, p: None,
        on_status=lambda j, s: None,
        auto_disconnect_on_result=False,
    )
    assert client.wait(job, timeout=30).succeeded
    assert set(management.job_queues(job.id)) == {QueueKind.PROGRESS, QueueKind.STATUS}
    client.disconnect_from_submitted_job(job)
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_without_auto_disconnect_leftover_queues_expire_after_close(
    make_client: Callable[[], AnyClient], worker: Path, management: Management
) -> None:
    with make_client() as client:
        job = client.submit_job(
            "demo.sleep",
            {"seconds": 0.1, "steps": 1},
            on_status=lambda j, s: None,
            auto_disconnect_on_result=False,
            auto_cleanup_after_ttl=3,
        )
        client.wait(job, timeout=30)
        assert set(management.job_queues(job.id)) == {QueueKind.STATUS}
    assert wait_until(lambda: not management.job_queues(job.id), 20)


def test_raising_on_finished_keeps_result_for_a_later_reconnect(
    make_client: Callable[[], AnyClient],
    any_client: AnyClient,
    management: Management,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = any_client
    calls = []

    def broken(job: Job, result: JobResult) -> None:
        calls.append(result)
        raise RuntimeError("database down")

    job = client.submit_job("demo.sleep", {"seconds": 0.1, "steps": 1}, on_finished=broken)
    with pytest.raises(CallbackError) as caught:
        client.wait(job, timeout=30)
    assert len(calls) == 1, "the result must not be redelivered in a loop"
    assert caught.value.callback == "on_finished"
    assert caught.value.result is not None and caught.value.result.output == {"slept": 0.1}
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "event=callback_failed" in caplog.text
    time.sleep(1)
    assert len(calls) == 1
    assert wait_until(
        lambda: (management.job_queues(job.id).get(QueueKind.RESULT) or {}).get("messages") == 1, 15
    ), "the result should wait in its queue"
    with make_client() as again:
        again.connect_to_submitted_job(job)
        assert again.wait(job, timeout=30).output == {"slept": 0.1}
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_raising_on_progress_still_delivers_everything(any_client: AnyClient, management: Management) -> None:
    client = any_client
    seen: list[float] = []

    def broken(job: Job, update: ProgressUpdate) -> None:
        seen.append(update.progress)
        raise ValueError("bad progress handler")

    job = client.submit_job("demo.sleep", {"seconds": 0.2, "steps": 2}, on_progress=broken)
    with pytest.raises(CallbackError) as caught:
        client.wait(job, timeout=30)
    assert seen == [0.5, 1.0]
    assert caught.value.callback == "on_progress"
    assert caught.value.result is not None and caught.value.result.succeeded
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_failing_workflow_gives_error_result(any_client: AnyClient, management: Management) -> None:
    client = any_client
    statuses: list[JobStatus] = []
    job = client.submit_job(
        "demo.fail", {"message": "disk full"}, on_status=lambda j, s: statuses.append(s.status)
    )
    result = client.wait(job, timeout=30)
    assert result.status is JobStatus.ERROR
    assert result.error is not None
    assert (result.error.type, result.error.message) == ("RuntimeError", "disk full")
    assert statuses == [JobStatus.RUNNING, JobStatus.ERROR]
    with pytest.raises(JobFailedError, match="disk full"):
        result.raise_for_status()
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_unknown_workflow_is_refused_before_any_queue_exists(
    any_client: AnyClient, management: Management
) -> None:
    client = any_client
    before = set(management.all_job_queue_names())
    with pytest.raises(UnknownWorkflowError) as caught:
        client.submit_job("no.such.workflow", {})
    assert "demo.sleep" in str(caught.value) and "no.such.workflow" in str(caught.value)
    assert "demo.sleep" in caught.value.known
    assert set(management.all_job_queue_names()) <= before


def test_workers_advertise_their_workflows(any_client: AnyClient) -> None:
    workflows = {w.name: w for w in any_client.list_workflows()}
    assert {"demo.sleep", "demo.fail", "demo.echo"} <= set(workflows)
    assert workflows["demo.sleep"].params == ("seconds", "steps")
    assert workflows["demo.sleep"].description.startswith("Sleep")
    assert workflows["demo.sleep"].workers >= 1


def test_worker_reports_an_unknown_workflow_as_error(
    settings: Settings, make_client: Callable[..., AnyClient], worker: Path
) -> None:
    """A caller that skipped the check (or could not ask Redis) still gets a clear ERROR result."""
    unchecked = Settings(**{**settings.__dict__, "check_workflows": False})
    with make_client(settings=unchecked) as client:
        result = client.wait(client.submit_job("no.such.workflow", {}), timeout=30)
    assert result.status is JobStatus.ERROR
    assert result.error is not None and "demo.sleep" in result.error.message


def test_oversized_params_are_refused(any_client: AnyClient, management: Management) -> None:
    before = set(management.all_job_queue_names())
    with pytest.raises(ValueError, match="EBB_MAX_PARAMS_BYTES"):
        any_client.submit_job("demo.echo", {"blob": "x" * 2_000_000})
    assert set(management.all_job_queue_names()) <= before


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        (0, ValueError),
        (-5, ValueError),
        (timedelta(0), ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (timedelta(days=365), ValueError),
        (8 * 24 * 3600, ValueError),
        ("48h", TypeError),
        (True, TypeError),
    ],
)
def test_invalid_ttl_is_refused_before_touching_the_broker(
    any_client: AnyClient, management: Management, ttl: object, error: type[Exception]
) -> None:
    before = set(management.all_job_queue_names())
    with pytest.raises(error, match="auto_cleanup_after_ttl"):
        any_client.submit_job("demo.sleep", {}, auto_cleanup_after_ttl=ttl)  # type: ignore[arg-type]
    assert set(management.all_job_queue_names()) <= before


def test_params_must_be_json(any_client: AnyClient) -> None:
    with pytest.raises(TypeError, match="JSON-serialisable"):
        any_client.submit_job("demo.sleep", {"when": object()})


def test_unknown_or_malformed_job_ids(any_client: AnyClient, management: Management) -> None:
    client = any_client
    stranger = uuid.uuid4()
    with pytest.raises(JobQueuesExpiredError, match=str(stranger)):
        client.connect_to_submitted_job(str(stranger))
    assert management.job_queues(stranger) == {}
    with pytest.raises(ValueError, match="not a UUID"):
        client.connect_to_submitted_job("../../etc")
    with pytest.raises(ValueError, match="not known to this client"):
        client.wait(uuid.uuid4(), timeout=0.1)


def test_callbacks_run_on_the_client_thread_and_one_connection_serves_many_jobs(
    client: JobClient, management: Management
) -> None:
    # JobClient only: AsyncJobClient runs plain callbacks in asyncio's executor, not on one thread.
    threads_before = threading.active_count()
    names: set[str] = set()
    jobs = [
        client.submit_job(
            "demo.echo", {"n": i}, on_finished=lambda j, r: names.add(threading.current_thread().name)
        )
        for i in range(60)
    ]
    outputs = [client.wait(job, timeout=60).output for job in jobs]
    assert outputs == [{"n": i} for i in range(60)]
    assert names == {"ebb-client"}
    assert threading.active_count() == threads_before
    assert all(not management.job_queues(job.id) for job in jobs[:5])


def test_job_round_trips_through_json() -> None:
    job = Job(uuid.uuid4(), "demo.sleep", timedelta(hours=2), frozenset(QueueKind), "ref-1")
    assert Job.from_json(job.to_json()) == job
    with pytest.raises(ValueError, match="Job JSON"):
        Job.from_json('{"id": "x"}')


@pytest.fixture
def silent_client(settings: Settings, make_client: Callable[..., AnyClient]) -> Iterator[AnyClient]:
    """A client whose jobs go to a task queue no worker reads: the test plays the worker."""
    with _silent(settings, make_client) as job_client:
        yield job_client


@contextlib.contextmanager
def _silent(settings: Settings, make_client: Callable[..., AnyClient]) -> Iterator[AnyClient]:
    quiet = Settings(
        **{**settings.__dict__, "task_queue": f"{settings.task_queue}.nobody", "check_workflows": False}
    )
    # Workers own the task queue; here no worker exists, so the test declares it, as one would.
    with Connection(settings.broker_url) as connection:
        connection.default_channel.queue_declare(quiet.task_queue, durable=True)
        with make_client(settings=quiet) as job_client:
            yield job_client
        connection.default_channel.queue_delete(quiet.task_queue)


def _play_worker(settings: Settings, job: Job, messages: list[tuple[QueueKind, bytes]]) -> None:
    """Publish raw bodies to the job's queues, in the given order, as a worker (or a vandal) would."""
    with Connection(settings.broker_url) as connection:
        channel = connection.channel()
        for kind, body in messages:
            message = Message(body, content_type="application/json", delivery_mode=2)
            channel.basic_publish(message, exchange="", routing_key=job.queue_name(kind), mandatory=True)
        channel.close()


def _result_body(job: Job, last_progress: int) -> bytes:
    result = JobResult(
        job_id=job.id,
        status=JobStatus.SUCCEEDED,
        output={"ok": True},
        last_seq={"progress": last_progress},
        at=time.time(),
    )
    return encode_message(result)


def _progress_body(job: Job, seq: int) -> bytes:
    update = ProgressUpdate(job.id, seq / 2, f"step {seq}", seq, time.time())
    return encode_message(update)


def test_result_that_overtakes_progress_waits_for_it(
    settings: Settings, silent_client: AnyClient, management: Management
) -> None:
    events: list[str] = []
    job = silent_client.submit_job(
        "demo.echo",
        {},
        on_progress=lambda j, p: events.append(f"progress {p.seq}"),
        on_finished=lambda j, r: events.append("finished"),
    )
    _play_worker(
        settings,
        job,
        [
            (QueueKind.RESULT, _result_body(job, 2)),
            (QueueKind.PROGRESS, _progress_body(job, 1)),
            (QueueKind.PROGRESS, _progress_body(job, 2)),
        ],
    )
    assert silent_client.wait(job, timeout=10).output == {"ok": True}
    assert events == ["progress 1", "progress 2", "finished"]
    assert wait_until(lambda: not management.job_queues(job.id), 10)


#: Jobs whose results arrive in one flood (at most EBB_KEEP_RESULTS, so every wait() finds its job).
FLOOD = 1000


def test_a_flood_of_results_wakes_each_wait_within_a_tenth_of_a_second_not_once_it_is_over(
    settings: Settings,
) -> None:
    """Results that keep arriving while ``JobClient`` handles them (each result's queue delete
    reads frames, and more deliveries with them) once kept one burst open until the flood was
    over: no wait() woke, no ack or record went out, for as long as that took (the first of
    1,000 woke 4.2 s after its on_finished; ``bench/bench_burst.py``: one burst held 692 of 1,000
    jobs released at once). A burst now ends every ``caller.BURST_SECONDS`` (or ``BURST_JOBS``).

    The asyncio client is not run here: its burst ends at a loop turn that adds nothing, which a
    flood leaves often enough (the same delays with and without the bound), and each of its
    waits wakes only once its job's queue delete, queued behind the earlier jobs' deletes on
    the one channel, is done; it follows the same bound (``test_caller``)."""
    with _silent(settings, lambda settings: JobClient(settings=settings)) as silent_client:
        _flood(settings, silent_client)


def _flood(settings: Settings, silent_client: AnyClient) -> None:
    finished_at: dict[uuid.UUID, float] = {}

    def on_finished(job: Job, result: object) -> None:
        finished_at.setdefault(job.id, time.monotonic())

    jobs = [
        silent_client.submit_job("demo.echo", {"n": n}, on_finished=on_finished, auto_cleanup_after_ttl=120)
        for n in range(FLOOD)
    ]
    woke_at: dict[uuid.UUID, float] = {}

    def waiter(job: Job) -> None:
        silent_client.wait(job, timeout=120)
        woke_at[job.id] = time.monotonic()

    watched = jobs[:: FLOOD // 10]
    threads = [threading.Thread(target=waiter, args=(job,)) for job in watched]
    for thread in threads:
        thread.start()
    with Connection(settings.broker_url) as connection:  # the flood: every result, back to back
        channel = connection.channel()
        for job in jobs:
            message = Message(_result_body(job, 0), content_type="application/json", delivery_mode=2)
            channel.basic_publish(message, exchange="", routing_key=job.queue_name(QueueKind.RESULT))
        channel.close()
    for thread in threads:
        thread.join(150)
    assert all(silent_client.wait(job, timeout=60).output == {"ok": True} for job in jobs[-10:])
    late = {str(job.id): round(woke_at[job.id] - finished_at[job.id], 3) for job in watched}
    assert max(late.values()) < 0.5, f"seconds from on_finished to wait() waking: {late}"


def test_malformed_messages_are_logged_and_skipped(
    settings: Settings,
    silent_client: AnyClient,
    management: Management,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    job = silent_client.submit_job(
        "demo.echo",
        {},
        on_progress=lambda j, p: events.append(f"progress {p.seq}"),
        on_finished=lambda j, r: events.append("finished"),
    )
    with caplog.at_level(logging.ERROR, "ebb.client"):
        _play_worker(
            settings,
            job,
            [
                (QueueKind.PROGRESS, b"{not json"),
                (QueueKind.PROGRESS, b'{"v": 99, "type": "progress"}'),
                (QueueKind.PROGRESS, _progress_body(job, 1)),
                (QueueKind.RESULT, _result_body(job, 1)),
            ],
        )
        assert silent_client.wait(job, timeout=10).succeeded
    assert events == ["progress 1", "finished"]
    assert caplog.text.count("event=message_malformed") == 2
    assert "schema version 99" in caplog.text
    assert f"queue=jobs.{job.id}.progress" in caplog.text
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_lost_straggler_does_not_hold_the_result_forever(
    settings: Settings, silent_client: AnyClient, caplog: pytest.LogCaptureFixture
) -> None:
    job = silent_client.submit_job("demo.echo", {}, on_progress=lambda j, p: None)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "ebb.client"):
        _play_worker(settings, job, [(QueueKind.RESULT, _result_body(job, 3))])
        assert silent_client.wait(job, timeout=10).succeeded
    assert time.monotonic() - started < 5
    assert "event=messages_missing" in caplog.text


def test_wait_in_another_thread_ends_when_the_client_closes(
    make_client: Callable[[], AnyClient], worker: Path
) -> None:
    client = make_client()
    job = client.submit_job("demo.sleep", {"seconds": 5, "steps": 1}, auto_cleanup_after_ttl=5)
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            client.wait(job, timeout=30)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    client.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and "closed" in str(outcome[0])


def test_missing_task_queue_is_an_error_not_a_silent_loss(
    settings: Settings, make_client: Callable[..., AnyClient], management: Management
) -> None:
    nowhere = Settings(
        **{**settings.__dict__, "task_queue": f"ebb.never.{uuid.uuid4().hex[:6]}", "check_workflows": False}
    )
    before = set(management.all_job_queue_names())
    with make_client(settings=nowhere) as client, pytest.raises(ConnectionError, match="does not exist"):
        client.submit_job("demo.echo", {}, on_progress=lambda j, p: None)
    assert wait_until(lambda: set(management.all_job_queue_names()) <= before, 10)


def test_reconnect_by_bare_id_learns_ttl_and_workflow_and_keeps_the_record(
    make_client: Callable[[], AnyClient], worker: Path
) -> None:
    with make_client() as first:
        job = first.submit_job("demo.sleep", {"seconds": 0.5, "steps": 1}, auto_cleanup_after_ttl=45)
        first.disconnect_from_submitted_job(job, delete_queues=False)
    with make_client() as second:
        handle = second.connect_to_submitted_job(str(job.id), on_finished=lambda j, r: None)
        assert handle.ttl == timedelta(seconds=45)
        assert handle.workflow == "demo.sleep"
        assert second.wait(handle, timeout=30).succeeded
        record = second.job_status(job.id)
    assert record.ttl == timedelta(seconds=45), "the reconnect overwrote the job's TTL in the registry"
    assert record.result_delivered


def test_a_client_that_cannot_connect_leaks_no_file_descriptors(
    make_client: Callable[..., AnyClient],
) -> None:
    unreachable = Settings(broker_url="amqp://guest:guest@127.0.0.1:1//", broker_timeout=2)
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(BrokerUnavailableError):
            make_client(settings=unreachable)
    gc.collect()
    # Other tests' sockets may close meanwhile; a leak would be two pipe ends per attempt.
    assert len(os.listdir("/proc/self/fd")) - before < 5


def test_a_flood_of_results_leaves_no_queue_behind_and_no_delete_owed_from_the_asyncio_client(
    settings: Settings, management: Management
) -> None:
    """Each result's queues are deleted on the one confirming channel. 10,000 results at once on
    RabbitMQ 4.3 once queued the deletes behind each other past ``EBB_BROKER_TIMEOUT``: the
    cancelled call closed the channel under every delete still waiting, and 4,638 jobs' queues
    stayed until their TTL (owed to a reconnect that never came). A delete now waits its turn
    before its time bound starts, and one that fails on a live connection is tried again."""
    tight = dataclasses.replace(settings, broker_timeout=0.5)  # a flood outlasts it many times over
    with _silent(tight, lambda settings: AsyncClientAsSync(settings=settings)) as client:
        assert isinstance(client, AsyncClientAsSync)
        jobs = [
            client.submit_job("demo.echo", {"n": n}, on_finished=lambda j, r: None, auto_cleanup_after_ttl=60)
            for n in range(FLOOD)
        ]
        with Connection(settings.broker_url) as connection:
            channel = connection.channel()
            for job in jobs:
                message = Message(_result_body(job, 0), content_type="application/json", delivery_mode=2)
                channel.basic_publish(message, exchange="", routing_key=job.queue_name(QueueKind.RESULT))
            channel.close()
        assert all(client.wait(job, timeout=120).output == {"ok": True} for job in jobs[-10:])
        owed = client.client._core.deletes_owed
        assert wait_until(lambda: not owed, 60), len(owed)
        assert client.reconnects == 0  # done on the live connection, not left to a reconnect
    names = {job.queue_name(QueueKind.RESULT) for job in jobs}
    assert not names & set(management.all_job_queue_names())
