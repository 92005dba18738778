"""The Redis job registry: it tells what happened to a job, even after its queues are gone."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebb import (
    Job,
    JobClient,
    JobQueuesExpiredError,
    JobStatus,
    RegistryUnavailableError,
    UnknownJobError,
)
from ebb.config import Settings
from tests.support import ClientProcess, Management, start_worker, stop_worker, wait_until

DEAD_REDIS = "redis://127.0.0.1:6399/0"  # nothing listens there: Redis is "down" for these processes


def test_record_follows_a_job_from_submission_to_delivery(client: JobClient) -> None:
    job = client.submit_job("demo.sleep", {"seconds": 1.5, "steps": 3}, reference="invoice-7")
    submitted = client.job_status(job)
    assert submitted.status in ("SUBMITTED", "RUNNING")
    assert submitted.workflow == "demo.sleep" and submitted.reference == "invoice-7"
    assert wait_until(lambda: client.job_status(job).status == "RUNNING", 10)
    running = client.job_status(job)
    assert running.started_at is not None and running.finished_at is None
    assert not running.result_delivered
    client.wait(job, timeout=30)
    done = client.job_status(job)
    assert done.status == "SUCCEEDED"
    assert done.result_delivered and done.result_delivered_at is not None
    assert done.finished_at is not None and done.started_at is not None
    assert done.finished_at >= done.started_at
    assert done.ttl == job.ttl
    assert "delivered" in done.story()


def test_record_expires_by_itself(settings: Settings, client: JobClient) -> None:
    job = client.submit_job("demo.echo", {}, auto_cleanup_after_ttl=60)
    client.wait(job, timeout=30)
    remaining = client._registry.client.ttl(f"ebb:job:{job.id}")
    expected = 60 + settings.registry_grace.total_seconds()
    assert isinstance(remaining, int) and expected - 10 <= remaining <= expected


def test_expired_job_tells_its_story(settings: Settings, worker: Path, management: Management) -> None:
    caller = ClientProcess("demo.sleep", {"seconds": 0.2, "steps": 1}, ttl=3)
    job = Job.from_json(caller.job_json)
    caller.kill()
    assert wait_until(lambda: not management.job_queues(job.id), 20)
    with JobClient(settings=settings) as client:
        record = client.job_status(job.id)
        assert record.status == JobStatus.SUCCEEDED.value
        assert not record.result_delivered
        with pytest.raises(JobQueuesExpiredError) as caught:
            client.connect_to_submitted_job(job.id)
    message = str(caught.value)
    assert "finished SUCCEEDED" in message
    assert "never delivered" in message


def test_unknown_job(client: JobClient) -> None:
    stranger = uuid.uuid4()
    with pytest.raises(UnknownJobError, match=str(stranger)):
        client.job_status(stranger)
    with pytest.raises(JobQueuesExpiredError, match="no record"):
        client.connect_to_submitted_job(stranger)


@pytest.fixture
def redis_down_settings(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A worker and settings for which Redis is unreachable; RabbitMQ works as usual."""
    queue = f"{settings.task_queue}.noredis"
    env = {"EBB_REDIS_URL": DEAD_REDIS, "EBB_TASK_QUEUE": queue}
    proc = start_worker(tmp_path / "worker.log", env=env)
    yield Settings(**{**settings.__dict__, "redis_url": DEAD_REDIS, "task_queue": queue})
    stop_worker(proc)
    with JobClient(settings=settings) as cleanup:
        cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete(queue))


def test_jobs_run_and_finish_while_redis_is_down(
    redis_down_settings: Settings, management: Management, caplog: pytest.LogCaptureFixture
) -> None:
    with JobClient(settings=redis_down_settings) as client, caplog.at_level(logging.WARNING):
        started = time.monotonic()
        jobs = [
            client.submit_job("demo.sleep", {"seconds": 0.2, "steps": 2}, on_progress=lambda j, p: None)
            for _ in range(5)
        ]
        results = [client.wait(job, timeout=30) for job in jobs]
        assert all(r.status is JobStatus.SUCCEEDED for r in results)
        assert time.monotonic() - started < 15, "a dead registry must not slow jobs down much"
        with pytest.raises(RegistryUnavailableError, match="EBB_REDIS_URL"):
            client.job_status(jobs[0])
    assert caplog.text.count("event=registry_unavailable") >= 1
    assert all(not management.job_queues(job.id) for job in jobs)
