"""The Redis job registry: it tells what happened to a job, even after its queues are gone."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
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
from ebb.records import SUBMITTED
from ebb.registry import Registry
from tests.chaos.world import RedisServer
from tests.conftest import AnyClient
from tests.support import (
    ClientProcess,
    Management,
    private_worker,
    start_worker,
    stop_worker,
    wait_until,
)

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


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop and resume without touching the suite's."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.shutdown()


def test_a_write_missed_while_redis_was_away_fills_in_what_nobody_set_since(
    settings: Settings, own_redis: RedisServer
) -> None:
    ours = Registry(dataclasses.replace(settings, redis_url=own_redis.url))
    job_id, ttl = uuid.uuid4(), timedelta(minutes=5)
    own_redis.shutdown()  # Redis is down: the submit record is kept
    assert not ours.write(job_id, ttl, {"workflow": "demo.sleep", "status": SUBMITTED})
    own_redis.start()
    # Meanwhile a worker moved the job on, with a registry of its own.
    assert Registry(dataclasses.replace(settings, redis_url=own_redis.url)).write(
        job_id, ttl, {"status": JobStatus.RUNNING.value}
    )
    other = uuid.uuid4()
    # The next write that gets through (after the quiet spell that follows a failure) takes it along.
    assert wait_until(lambda: ours.write(other, ttl, {"workflow": "demo.echo"}), 15)
    record = ours.get(job_id)
    assert record is not None and record.workflow == "demo.sleep"
    assert record.status == JobStatus.RUNNING.value, "a late write must not set the job back"


def test_a_job_submitted_while_redis_was_away_gets_its_record_once_it_is_back(
    settings: Settings, make_client: Callable[..., AnyClient], own_redis: RedisServer, tmp_path: Path
) -> None:
    env = {"EBB_REDIS_URL": own_redis.url}
    with private_worker(settings, tmp_path / "worker.log", env=env, name="kept") as private:
        caller = dataclasses.replace(private, redis_url=own_redis.url)
        with make_client(settings=caller) as client:
            assert client.wait(client.submit_job("demo.echo", {"n": 0}), timeout=30).succeeded
            own_redis.shutdown()
            away = client.submit_job("demo.echo", {"n": 1})
            assert client.wait(away, timeout=30).succeeded
            own_redis.start()

            def recorded() -> bool:
                client.wait(client.submit_job("demo.echo", {"n": 2}), timeout=30)  # a write
                try:
                    return client.job_status(away) is not None
                except UnknownJobError:
                    return False

            assert wait_until(recorded, 30), "the job submitted while Redis was away has no record"
            record = client.job_status(away)
            assert record.workflow == "demo.echo" and record.submitted_at


def test_the_audit_renews_records_of_jobs_in_use_and_never_revives_a_forgotten_one(
    settings: Settings,
) -> None:
    """What an audit does for every job whose queues have a consumer: 100,000 of them in one
    script call per 1,000, so the record of a job deleted meanwhile must not come back as a stub."""
    registry = Registry(settings)
    kept, forgotten = uuid.uuid4(), uuid.uuid4()
    ttl = timedelta(seconds=30)
    assert registry.write(kept, ttl, {"status": SUBMITTED, "ttl": ttl})
    registry.touch_in_use({kept: timedelta(seconds=600), forgotten: timedelta(seconds=600)}, now=1234.5)
    record = registry.get(kept)
    assert record is not None and record.queues_last_in_use == 1234.5
    assert record.status == SUBMITTED
    assert registry.client.ttl(f"ebb:job:{kept}") > (600 + settings.registry_grace.total_seconds()) - 60
    assert registry.get(forgotten) is None, "a record nobody wrote must not be created"
    registry.client.delete(f"ebb:job:{kept}")
