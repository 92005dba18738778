"""Faults made to happen for real: connections cut, workers killed, servers restarted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from ebb import Job, JobClient, JobResult, JobStatus
from ebb.config import Settings
from tests.support import Management, kill_worker, start_worker, stop_worker, wait_until


def close_connection_of(client: JobClient, settings: Settings) -> None:
    """Have the broker close this client's connection, as an operator (or a failover) would."""
    assert client._loop.connection is not None
    port = client._loop.connection.connection.sock.getsockname()[1]
    auth = (settings.management_user, settings.management_password)
    url = f"{settings.management_url}/api/connections"
    assert wait_until(
        lambda: any(c.get("peer_port") == port for c in requests.get(url, auth=auth, timeout=10).json()), 15
    )
    name = next(
        c["name"] for c in requests.get(url, auth=auth, timeout=10).json() if c.get("peer_port") == port
    )
    response = requests.delete(
        f"{url}/{quote(name, safe='')}",
        auth=auth,
        headers={"X-Reason": "test cuts the caller off"},
        timeout=10,
    )
    assert response.status_code in (200, 204)


def test_client_reconnects_after_broker_closes_its_connection(
    client: JobClient, settings: Settings, management: Management
) -> None:
    finished: list[JobResult] = []
    progress: list[tuple[int, int]] = []
    job = client.submit_job(
        "demo.sleep",
        {"seconds": 3, "steps": 6},
        on_finished=lambda j, r: finished.append(r),
        on_progress=lambda j, p: progress.append((p.attempt, p.seq)),
    )
    assert wait_until(lambda: len(progress) >= 1, 10)
    close_connection_of(client, settings)
    other = client_submit_when_back(client)
    result = client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED
    assert len(finished) == 1
    assert client._loop.reconnects >= 1
    assert len(progress) == len(set(progress)), "a progress message was delivered twice"
    assert client.wait(other, timeout=30).succeeded
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def client_submit_when_back(client: JobClient) -> Job:
    """Submitting while the client reconnects fails fast; once it is back, it works."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return client.submit_job("demo.echo", {"after": "reconnect"})
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def private_queue(settings: Settings) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Settings and worker environment for a task queue no other worker reads."""
    queue = f"{settings.task_queue}.{uuid.uuid4().hex[:8]}"
    yield Settings(**{**settings.__dict__, "task_queue": queue}), {"EBB_TASK_QUEUE": queue}
    with JobClient(settings=settings) as cleanup:
        cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete(queue))


def test_job_of_a_killed_worker_is_run_by_another(
    private_queue: tuple[Settings, dict[str, str]], tmp_path: Path, management: Management
) -> None:
    settings, env = private_queue
    statuses: list[tuple[int, JobStatus]] = []
    finished: list[JobResult] = []
    first = start_worker(tmp_path / "a.log", env=env)
    with JobClient(settings=settings) as client:
        job = client.submit_job(
            "demo.sleep",
            {"seconds": 2, "steps": 2},
            on_status=lambda j, s: statuses.append((s.attempt, s.status)),
            on_finished=lambda j, r: finished.append(r),
        )
        assert wait_until(lambda: statuses == [(1, JobStatus.RUNNING)], 15)
        kill_worker(first)
        second = start_worker(tmp_path / "b.log", env=env)
        try:
            result = client.wait(job, timeout=30)
        finally:
            stop_worker(second)
        assert result.status is JobStatus.SUCCEEDED and result.attempt == 2
        assert len(finished) == 1
        assert statuses == [(1, JobStatus.RUNNING), (2, JobStatus.RUNNING), (2, JobStatus.SUCCEEDED)]
        assert client.job_status(job).attempts == 2
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_job_whose_workers_keep_dying_ends_in_error(
    private_queue: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, env = private_queue
    env = {**env, "EBB_MAX_ATTEMPTS": "2"}
    worker = start_worker(tmp_path / "w1.log", env=env)
    with JobClient(settings=settings) as client:
        statuses: list[JobStatus] = []
        job = client.submit_job(
            "demo.sleep", {"seconds": 20, "steps": 1}, on_status=lambda j, s: statuses.append(s.status)
        )
        for attempt in (1, 2):
            if attempt == 2:
                worker = start_worker(tmp_path / "w2.log", env=env)
            assert wait_until(
                lambda n=attempt: (  # type: ignore[misc]
                    client.job_status(job).attempts == n and statuses.count(JobStatus.RUNNING) == n
                ),
                20,
            )
            kill_worker(worker)
        last = start_worker(tmp_path / "w3.log", env=env)
        try:
            result = client.wait(job, timeout=30)
        finally:
            stop_worker(last)
    assert result.status is JobStatus.ERROR and result.error is not None
    assert result.error.type == "WorkerLostError"
    assert "EBB_MAX_ATTEMPTS=2" in result.error.message
    assert statuses == [JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.ERROR]
