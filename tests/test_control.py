"""Job control: cancel, timeouts, and what an ERROR result carries; with both clients."""

from __future__ import annotations

import time

import pytest

from ebb import JobStatus, UnknownJobError
from tests.conftest import AnyClient
from tests.support import Management, wait_until


def test_cancel_a_running_job(any_client: AnyClient, management: Management) -> None:
    client = any_client
    statuses: list[JobStatus] = []
    job = client.submit_job(
        "demo.sleep", {"seconds": 30, "steps": 30}, on_status=lambda j, s: statuses.append(s.status)
    )
    assert wait_until(lambda: JobStatus.RUNNING in statuses, 15)
    started = time.monotonic()
    client.cancel_job(job)
    result = client.wait(job, timeout=15)
    assert time.monotonic() - started < 5
    assert result.status is JobStatus.CANCELLED
    assert statuses == [JobStatus.RUNNING, JobStatus.CANCELLED]
    assert client.job_status(job).status == "CANCELLED"
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_cancel_a_queued_job_it_never_starts(any_client: AnyClient, management: Management) -> None:
    client = any_client
    blockers = [
        client.submit_job("demo.sleep", {"seconds": 3, "steps": 1}) for _ in range(3)
    ]  # fill the worker
    statuses: list[JobStatus] = []
    job = client.submit_job("demo.echo", {}, on_status=lambda j, s: statuses.append(s.status))
    client.cancel_job(job)
    result = client.wait(job, timeout=30)
    assert result.status is JobStatus.CANCELLED
    assert statuses == [JobStatus.CANCELLED], "a cancelled queued job must never run"
    assert client.job_status(job).started_at is None
    for blocker in blockers:
        assert client.wait(blocker, timeout=30).succeeded
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_cancel_cannot_be_swallowed_by_the_workflow(any_client: AnyClient) -> None:
    client = any_client
    job = client.submit_job("demo.stubborn", {"seconds": 30}, on_status=lambda j, s: None)
    assert wait_until(lambda: client.job_status(job).status == "RUNNING", 15)
    client.cancel_job(job)
    assert client.wait(job, timeout=10).status is JobStatus.CANCELLED


def test_timeout_stops_a_long_job(any_client: AnyClient) -> None:
    client = any_client
    statuses: list[JobStatus] = []
    started = time.monotonic()
    job = client.submit_job(
        "demo.stubborn", {"seconds": 30}, job_timeout=1.5, on_status=lambda j, s: statuses.append(s.status)
    )
    result = client.wait(job, timeout=20)
    elapsed = time.monotonic() - started
    assert result.status is JobStatus.TIMEOUT
    assert result.error is not None and "1.5 s" in result.error.message
    assert 1.4 <= elapsed < 6
    assert statuses == [JobStatus.RUNNING, JobStatus.TIMEOUT]


def test_a_job_within_its_timeout_succeeds(any_client: AnyClient) -> None:
    client = any_client
    job = client.submit_job("demo.sleep", {"seconds": 0.3, "steps": 1}, job_timeout=10)
    assert client.wait(job, timeout=20).succeeded


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "10m"])
def test_invalid_timeouts_are_refused(any_client: AnyClient, bad: object) -> None:
    client = any_client
    with pytest.raises((ValueError, TypeError), match="job_timeout"):
        client.submit_job("demo.echo", {}, job_timeout=bad)  # type: ignore[arg-type]


def test_cancel_unknown_job(any_client: AnyClient) -> None:
    client = any_client
    import uuid

    with pytest.raises(UnknownJobError):
        client.cancel_job(uuid.uuid4())


def test_error_result_carries_traceback_and_workflow_logs(any_client: AnyClient) -> None:
    client = any_client
    result = client.wait(client.submit_job("demo.fail", {"message": "no disk"}), timeout=30)
    assert result.status is JobStatus.ERROR and result.error is not None
    assert "Traceback" in result.error.traceback and "RuntimeError: no disk" in result.error.traceback
    assert "tasks/demo.py" in result.error.traceback
    assert result.error.logs == ("WARNING ebb.demo: about to fail on purpose",)
