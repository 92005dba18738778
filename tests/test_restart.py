"""RabbitMQ restarted under running, queued and finished-but-unconsumed jobs: nothing is lost."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sdk import Job, JobClient, JobResult, JobStatus
from sdk.config import Settings
from sdk.contract import QueueKind
from tests.support import ClientProcess, Management, start_worker, stop_worker, wait_until


def restart_rabbitmq(settings: Settings) -> None:
    """Stop and start the RabbitMQ application: every connection drops, durable state survives."""
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    time.sleep(1)
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)

    def management_up() -> bool:
        try:
            return requests.get(
                f"{settings.management_url}/api/overview",
                auth=(settings.management_user, settings.management_password),
                timeout=2,
            ).ok
        except requests.RequestException:
            return False

    assert wait_until(management_up, 60), "RabbitMQ did not come back"


@pytest.fixture
def private_worker(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    queue = f"{settings.task_queue}.restart.{uuid.uuid4().hex[:6]}"
    proc = start_worker(tmp_path / "worker.log", "-c", "1", env={"EBB_TASK_QUEUE": queue})
    yield Settings(**{**settings.__dict__, "task_queue": queue})
    stop_worker(proc)
    with JobClient(settings=settings) as cleanup:
        cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete(queue))


def test_broker_restart_loses_nothing(
    settings: Settings, worker: Path, private_worker: Settings, management: Management
) -> None:
    # finished but unconsumed: its caller is gone; and one whose TTL must still run out afterwards
    waiting = ClientProcess("demo.sleep", {"seconds": 1, "steps": 1}, ttl=120)
    waiting.kill()
    expiring = ClientProcess("demo.sleep", {"seconds": 1, "steps": 1}, ttl=8)
    expiring.kill()
    waiting_job, expiring_job = Job.from_json(waiting.job_json), Job.from_json(expiring.job_json)
    assert wait_until(
        lambda: (management.job_queues(waiting_job.id).get(QueueKind.RESULT) or {}).get("messages") == 1, 20
    )

    finished: dict[uuid.UUID, list[JobResult]] = {}
    progress: list[tuple[int, int]] = []

    def on_finished(job: Job, result: JobResult) -> None:
        finished.setdefault(job.id, []).append(result)

    with JobClient(settings=private_worker) as client:
        running = client.submit_job(
            "demo.sleep",
            {"seconds": 6, "steps": 6},
            on_finished=on_finished,
            on_progress=lambda j, p: progress.append((p.attempt, p.seq)),
        )
        queued = client.submit_job("demo.sleep", {"seconds": 0.5, "steps": 1}, on_finished=on_finished)
        assert wait_until(lambda: len(progress) >= 1, 15)
        restart_rabbitmq(settings)
        assert client.wait(running, timeout=60).status is JobStatus.SUCCEEDED
        assert client.wait(queued, timeout=60).status is JobStatus.SUCCEEDED
        assert client._loop.reconnects >= 1
    assert [len(finished[running.id]), len(finished[queued.id])] == [1, 1]
    assert len(progress) == len(set(progress)), "progress delivered twice"

    with JobClient(settings=settings) as late:
        late.connect_to_submitted_job(waiting_job)
        assert late.wait(waiting_job, timeout=30).output == {"slept": 1}

    for job in (running, queued, waiting_job):
        assert wait_until(lambda j=job: not management.job_queues(j.id), 15)  # type: ignore[misc]
    # The expiring job's queues survived the restart and still expire on their TTL.
    assert wait_until(lambda: not management.job_queues(expiring_job.id), 30)
