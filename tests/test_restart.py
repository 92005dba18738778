"""RabbitMQ restarted under running, queued and finished-but-unconsumed jobs: nothing is lost."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import amqp
import pytest
import redis
import requests

from ebb import EbbError, Job, JobClient, JobResult, JobStatus, RegistryUnavailableError
from ebb.config import Settings
from ebb.contract import QueueKind
from tests.conftest import AnyClient, reconnects
from tests.support import (
    ClientProcess,
    Management,
    amqp_endpoint,
    private_worker,
    rabbitmqctl,
    redis_endpoint,
    wait_until,
)


def restart_rabbitmq(settings: Settings) -> None:
    """Stop and start the RabbitMQ application: every connection drops, durable state survives."""
    rabbitmqctl("-q", "stop_app")
    time.sleep(1)
    rabbitmqctl("-q", "start_app")

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
def restart_worker(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    with private_worker(settings, tmp_path / "worker.log", "-c", "1", name="restart") as private:
        yield private


def test_broker_restart_loses_nothing(
    settings: Settings,
    client_kind: str,
    make_client: Callable[..., AnyClient],
    worker: Path,
    restart_worker: Settings,
    management: Management,
) -> None:
    # finished but unconsumed: its caller is gone; and one whose TTL must still run out afterwards.
    # The waiting one's caller was of the other kind, so the client under test takes over across kinds.
    other_kind = "async" if client_kind == "sync" else "sync"
    waiting = ClientProcess("demo.sleep", {"seconds": 1, "steps": 1}, ttl=120, kind=other_kind)
    waiting.kill()
    expiring = ClientProcess("demo.sleep", {"seconds": 1, "steps": 1}, ttl=8, kind=client_kind)
    expiring.kill()
    waiting_job, expiring_job = Job.from_json(waiting.job_json), Job.from_json(expiring.job_json)
    assert wait_until(
        lambda: (management.job_queues(waiting_job.id).get(QueueKind.RESULT) or {}).get("messages") == 1, 20
    )

    finished: dict[uuid.UUID, list[JobResult]] = {}
    progress: list[tuple[int, int]] = []

    def on_finished(job: Job, result: JobResult) -> None:
        finished.setdefault(job.id, []).append(result)

    with make_client(settings=restart_worker) as client:
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
        assert reconnects(client) >= 1
    assert [len(finished[running.id]), len(finished[queued.id])] == [1, 1]
    assert len(progress) == len(set(progress)), "progress delivered twice"

    with make_client() as late:
        late.connect_to_submitted_job(waiting_job)
        assert late.wait(waiting_job, timeout=30).output == {"slept": 1}

    for job in (running, queued, waiting_job):
        assert wait_until(lambda j=job: not management.job_queues(j.id), 15)  # type: ignore[misc]
    # The expiring job's queues survived the restart and still expire on their TTL.
    assert wait_until(lambda: not management.job_queues(expiring_job.id), 30)


def _redis_up(settings: Settings) -> bool:
    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def test_redis_stopped_and_started_while_jobs_run(
    settings: Settings, client: JobClient, management: Management, caplog: pytest.LogCaptureFixture
) -> None:
    progress: list[float] = []
    jobs = [
        client.submit_job(
            "demo.sleep", {"seconds": 4, "steps": 4}, on_progress=lambda j, p: progress.append(p.progress)
        )
        for _ in range(3)
    ]
    assert wait_until(lambda: len(progress) >= 1, 15)
    redis_host, redis_port = redis_endpoint(settings)
    subprocess.run(["redis-cli", "-h", redis_host, "-p", str(redis_port), "shutdown", "nosave"], timeout=30)
    try:
        assert wait_until(lambda: not _redis_up(settings), 10), "Redis did not stop"
        with caplog.at_level(logging.WARNING, "ebb.registry"):
            results = [client.wait(job, timeout=30) for job in jobs]  # finish while Redis is down
        assert all(r.status is JobStatus.SUCCEEDED for r in results)
        assert "event=registry_unavailable" in caplog.text
        with pytest.raises(RegistryUnavailableError):
            client.job_status(jobs[0])
    finally:
        subprocess.run(
            [
                "redis-server",
                "--daemonize",
                "yes",
                "--bind",
                redis_host,
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
            timeout=30,
        )
        assert wait_until(lambda: _redis_up(settings), 20), "Redis did not come back"
    assert all(not management.job_queues(job.id) for job in jobs)
    time.sleep(5.5)  # the registry retries 5 s after an outage
    later = client.submit_job("demo.echo", {"n": 1})
    assert client.wait(later, timeout=30).succeeded
    assert client.job_status(later).result_delivered, "the registry did not recover"


def test_no_confirmed_job_is_lost_across_a_broker_restart(
    settings: Settings, client_kind: str, make_client: Callable[..., AnyClient]
) -> None:
    """Issue 20's probe: a submit every 50 ms through stop_app/start_app; every job whose
    ``submit_job`` returned must be in the task queue afterwards (nobody reads it)."""
    queue = f"{settings.task_queue}.confirmed.{uuid.uuid4().hex[:6]}"
    private = Settings(**{**settings.__dict__, "task_queue": queue, "check_workflows": False})
    host, port = amqp_endpoint(settings)
    with amqp.Connection(f"{host}:{port}", userid="guest", password="guest") as admin:
        admin.channel().queue_declare(queue, durable=True, auto_delete=False)
    confirmed: list[str] = []
    refused = 0
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(2)
        restart_rabbitmq(settings)
        restarted.set()

    restarter = threading.Thread(target=restart)
    with make_client(settings=private) as client:
        restarter.start()
        deadline = time.monotonic() + 60
        after_restart = 0
        while after_restart < 20 and time.monotonic() < deadline:
            try:
                job = client.submit_job("demo.echo", {"n": len(confirmed)}, auto_cleanup_after_ttl=20)
                confirmed.append(str(job.id))
                after_restart += restarted.is_set()
            except EbbError:
                refused += 1
            time.sleep(0.05)
        restarter.join(120)
    assert refused > 0, "no submit ran into the restart: the test did not test it"
    with amqp.Connection(f"{host}:{port}", userid="guest", password="guest") as admin:
        channel = admin.channel()
        queued = set()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            queued.add(message.properties.get("correlation_id"))
        channel.queue_delete(queue)
    lost = [job for job in confirmed if job not in queued]
    assert not lost, f"{len(lost)} of {len(confirmed)} confirmed jobs are not in the task queue: {lost[:5]}"
