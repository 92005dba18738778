"""The five cleanup scenarios of the feature, against real RabbitMQ and a real worker.

Each one ends by asking the broker itself (management API) which of the job's queues exist. Each
runs with both clients (``client_kind``); where a caller process is killed, it was a sync or an
async caller (``caller_kind``) before the client under test reconnects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ebb import Job, JobQueuesExpiredError, JobStatus
from ebb.contract import QueueKind
from tests.conftest import AnyClient
from tests.support import ClientProcess, Management, wait_until

Events = list[tuple[str, object]]


def recorder(events: Events) -> dict[str, object]:
    return {
        "on_progress": lambda job, p: events.append(("progress", p.progress)),
        "on_status": lambda job, s: events.append(("status", s.status)),
        "on_finished": lambda job, r: events.append(("finished", r.status)),
    }


def assert_queues_gone(management: Management, job: Job, timeout: float = 10) -> None:
    assert wait_until(lambda: not management.job_queues(job.id), timeout), (
        f"queues of {job.id} still exist: {sorted(management.job_queues(job.id))}"
    )


def test_happy_path_removes_all_queues(any_client: AnyClient, management: Management) -> None:
    client = any_client
    events: Events = []
    job = client.submit_job("demo.sleep", {"seconds": 0.4, "steps": 2}, **recorder(events))  # type: ignore[arg-type]
    assert set(management.job_queues(job.id)) == set(QueueKind)
    result = client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED
    assert result.output == {"slept": 0.4}
    assert events == [
        ("status", JobStatus.RUNNING),
        ("progress", 0.5),
        ("progress", 1.0),
        ("status", JobStatus.SUCCEEDED),
        ("finished", JobStatus.SUCCEEDED),
    ]
    assert management.job_queues(job.id) == {}


def test_queues_are_durable_and_expire(any_client: AnyClient, management: Management) -> None:
    client = any_client
    job = client.submit_job(
        "demo.sleep",
        {"seconds": 1, "steps": 1},
        on_status=lambda j, s: None,
        on_progress=lambda j, p: None,
        auto_cleanup_after_ttl=90,
    )
    queues = management.job_queues(job.id)
    assert set(queues) == set(QueueKind)
    for info in queues.values():
        assert info["durable"] is True
        assert info["auto_delete"] is False
        assert info["exclusive"] is False
        assert info["arguments"]["x-expires"] == 90_000
    client.wait(job, timeout=30)


def test_only_requested_queues_are_declared(any_client: AnyClient, management: Management) -> None:
    client = any_client
    job = client.submit_job("demo.sleep", {"seconds": 1, "steps": 2})
    assert set(management.job_queues(job.id)) == {QueueKind.RESULT}
    assert client.wait(job, timeout=30).status is JobStatus.SUCCEEDED
    assert management.job_queues(job.id) == {}


def test_immediate_reconnect_after_two_seconds_offline(
    make_client: Callable[[], AnyClient], caller_kind: str, worker: Path, management: Management
) -> None:
    caller = ClientProcess("demo.sleep", {"seconds": 4, "steps": 2}, ttl=6, kind=caller_kind)
    job = Job.from_json(caller.job_json)
    assert caller.read_event() == "status RUNNING"
    caller.kill()
    time.sleep(2)  # offline: no consumer, the TTL is running
    assert set(management.job_queues(job.id)) == set(QueueKind)
    events: Events = []
    with make_client() as client:
        client.connect_to_submitted_job(job, **recorder(events))  # type: ignore[arg-type]
        time.sleep(5)  # beyond the 6 s TTL counted from the kill: connected queues must not expire
        result = client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED
    assert events[-1] == ("finished", JobStatus.SUCCEEDED)
    assert ("status", JobStatus.SUCCEEDED) in events
    assert_queues_gone(management, job)


def test_reconnect_after_job_finished_gets_everything_that_waited(
    make_client: Callable[[], AnyClient], caller_kind: str, worker: Path, management: Management
) -> None:
    # Its callbacks never return, so nothing that reached it before the kill was acknowledged.
    caller = ClientProcess(
        "demo.sleep", {"seconds": 1, "steps": 4}, ttl=30, callbacks="held", kind=caller_kind
    )
    job = Job.from_json(caller.job_json)
    caller.kill()
    assert wait_until(
        lambda: (management.job_queues(job.id).get(QueueKind.RESULT) or {}).get("messages") == 1, 20
    ), "the result never reached its queue"
    events: Events = []
    with make_client() as client:
        client.connect_to_submitted_job(job.id, **recorder(events))  # type: ignore[arg-type]
        result = client.wait(job.id, timeout=30)
    assert result.output == {"slept": 1}
    assert [e for e in events if e[0] == "progress"] == [
        ("progress", 0.25),
        ("progress", 0.5),
        ("progress", 0.75),
        ("progress", 1.0),
    ]
    assert [e for e in events if e[0] == "status"] == [
        ("status", JobStatus.RUNNING),
        ("status", JobStatus.SUCCEEDED),
    ]
    assert events[-1] == ("finished", JobStatus.SUCCEEDED)
    assert_queues_gone(management, job)


def test_never_reconnect_queues_expire_by_ttl(caller_kind: str, worker: Path, management: Management) -> None:
    """No client comes back, so only the kind of the caller that was killed varies."""
    caller = ClientProcess("demo.sleep", {"seconds": 0.2, "steps": 1}, ttl=4, kind=caller_kind)
    job = Job.from_json(caller.job_json)
    assert caller.read_event() == "status RUNNING"
    caller.kill()
    killed_at = time.monotonic()
    assert set(management.job_queues(job.id)) == set(QueueKind)
    # The result waits for a caller that never comes, until the broker deletes all three queues.
    assert_queues_gone(management, job, timeout=20)
    assert time.monotonic() - killed_at >= 3.0, "queues vanished before their TTL"


def test_reconnect_after_expiry_raises_and_recreates_nothing(
    make_client: Callable[[], AnyClient], caller_kind: str, worker: Path, management: Management
) -> None:
    caller = ClientProcess("demo.sleep", {"seconds": 0.1, "steps": 1}, ttl=2, kind=caller_kind)
    job = Job.from_json(caller.job_json)
    caller.kill()
    assert_queues_gone(management, job, timeout=20)
    with make_client() as client:
        with pytest.raises(JobQueuesExpiredError) as caught:
            client.connect_to_submitted_job(job, on_finished=lambda j, r: None)
        assert str(job.id) in str(caught.value)
        assert caught.value.job_id == job.id
        with pytest.raises(ValueError, match="not known to this client"):
            client.wait(job, timeout=1)
    time.sleep(1)
    assert management.job_queues(job.id) == {}, "trying to reconnect re-created a queue"
