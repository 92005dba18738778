"""Only JSON is ever accepted, and callers and workers get only the RabbitMQ rights they need."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp.exceptions
import pytest
import requests
from kombu.connection import Connection

from ebb import JobClient, JobStatus
from ebb.config import Settings
from ebb.contract import QueueKind, queue_name
from tests.support import (
    Management,
    broker_url_as,
    publish_pickled_job,
    start_worker,
    stop_worker,
    wait_until,
)

#: The permissions the README and docker-compose.yml give each role (configure, write, read).
CALLER_PERMISSIONS = {
    "configure": r"^jobs\..+$",
    "write": r"^amq\.default$",
    "read": r"^jobs\..+$",
}
WORKER_PERMISSIONS = {"configure": r"^(?!jobs\.).*", "write": ".*", "read": r"^(?!jobs\.).*"}


def test_pickled_task_is_rejected_not_executed(
    settings: Settings, worker: Path, management: Management, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    job_id = uuid.uuid4()
    publish_pickled_job(settings, job_id, marker)
    assert wait_until(
        lambda: "ContentDisallowed" in worker.read_text() and str(job_id) in worker.read_text(), 15
    ) or (wait_until(lambda: "disallowed" in worker.read_text().lower(), 5))
    assert not marker.exists(), "the worker unpickled a message"
    assert (management.queue(queue_name(job_id, QueueKind.RESULT)) or {}).get("messages", 0) == 0


def _put(settings: Settings, path: str, body: dict[str, Any]) -> None:
    response = requests.put(
        f"{settings.management_url}/api/{path}",
        json=body,
        auth=(settings.management_user, settings.management_password),
        timeout=10,
    )
    assert response.status_code in (201, 204), response.text


@pytest.fixture
def role_users(settings: Settings) -> Iterator[tuple[Settings, Settings]]:
    """A caller user and a worker user with the documented permissions, and settings for each."""
    vhost = quote(settings.vhost, safe="")
    names = {"caller": f"ebb-caller-{uuid.uuid4().hex[:6]}", "worker": f"ebb-worker-{uuid.uuid4().hex[:6]}"}
    passwords = {role: secrets.token_urlsafe(12) for role in names}
    for role, perms in (("caller", CALLER_PERMISSIONS), ("worker", WORKER_PERMISSIONS)):
        _put(settings, f"users/{names[role]}", {"password": passwords[role], "tags": ""})
        _put(settings, f"permissions/{vhost}/{names[role]}", perms)
    queue = f"{settings.task_queue}.perm"

    def as_role(role: str) -> Settings:
        url = broker_url_as(settings, names[role], passwords[role])
        return Settings(**{**settings.__dict__, "broker_url": url, "task_queue": queue})

    yield as_role("caller"), as_role("worker")
    for name in names.values():
        requests.delete(
            f"{settings.management_url}/api/users/{name}",
            auth=(settings.management_user, settings.management_password),
            timeout=10,
        )
    with Connection(settings.broker_url) as connection:
        connection.channel().queue_delete(queue)


def test_caller_and_worker_users_can_do_their_job_and_nothing_else(
    role_users: tuple[Settings, Settings], tmp_path: Path, management: Management
) -> None:
    caller, worker_settings = role_users
    proc = start_worker(
        tmp_path / "worker.log",
        env={"EBB_BROKER_URL": worker_settings.broker_url, "EBB_TASK_QUEUE": worker_settings.task_queue},
    )
    try:
        with JobClient(settings=caller) as client:
            job = client.submit_job(
                "demo.sleep",
                {"seconds": 0.2, "steps": 2},
                on_progress=lambda j, p: None,
                on_status=lambda j, s: None,
            )
            assert client.wait(job, timeout=30).status is JobStatus.SUCCEEDED
        assert wait_until(lambda: not management.job_queues(job.id), 10)
        # A caller cannot read or delete the workers' task queue.
        with Connection(caller.broker_url) as connection:
            with pytest.raises(amqp.exceptions.AccessRefused):
                connection.channel().basic_get(caller.task_queue)
            with pytest.raises(amqp.exceptions.AccessRefused):
                connection.channel().queue_delete(caller.task_queue)
        # A worker cannot create (or re-create) a job queue.
        with (
            Connection(worker_settings.broker_url) as connection,
            pytest.raises(amqp.exceptions.AccessRefused),
        ):
            connection.channel().queue_declare(queue_name(uuid.uuid4(), QueueKind.RESULT), durable=True)
    finally:
        stop_worker(proc)
