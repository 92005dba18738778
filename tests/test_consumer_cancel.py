"""RabbitMQ cancels a consumer whose queue is deleted (or whose node goes down): the client hears it.

Before, both clients ignored the broker's ``basic.cancel``: a job queue deleted by an operator
under a waiting caller left ``wait()`` without a timeout waiting for ever. Now the client asks
the broker which of the job's queues are left and goes on with the truth (both clients).
"""

from __future__ import annotations

import time
from pathlib import Path

import amqp
import pytest

from ebb import JobQueuesExpiredError, JobStatus
from ebb.config import Settings
from ebb.contract import QueueKind
from tests.conftest import AnyClient
from tests.support import Management, amqp_endpoint, wait_until


def delete_queue(settings: Settings, name: str) -> None:
    """What an operator does (rabbitmqctl delete_queue, the management UI)."""
    host, port = amqp_endpoint(settings)
    with amqp.Connection(f"{host}:{port}", userid="guest", password="guest") as admin:
        admin.channel().queue_delete(name)


def test_a_result_queue_deleted_under_a_waiting_caller_ends_the_wait_with_a_clear_error(
    any_client: AnyClient, settings: Settings, management: Management, worker: Path
) -> None:
    states: list[str] = []
    job = any_client.submit_job(
        "demo.sleep",
        {"seconds": 8, "steps": 2},
        on_status=lambda j, s: states.append(s.status.value),
        auto_cleanup_after_ttl=60,
    )
    assert wait_until(lambda: "RUNNING" in states, 20), "the job never started"
    delete_queue(settings, job.queue_name(QueueKind.RESULT))
    started = time.monotonic()
    with pytest.raises(JobQueuesExpiredError, match="RabbitMQ cancelled the consumer"):
        any_client.wait(job)  # no timeout: before, this never returned
    assert time.monotonic() - started < 10
    assert wait_until(lambda: not management.job_queues(job.id), 20), "the job's other queues were left"


def test_a_progress_queue_deleted_under_a_caller_costs_only_the_progress(
    any_client: AnyClient, settings: Settings, worker: Path
) -> None:
    progress: list[float] = []
    job = any_client.submit_job(
        "demo.sleep",
        {"seconds": 4, "steps": 4},
        on_progress=lambda j, p: progress.append(p.progress),
        auto_cleanup_after_ttl=60,
    )
    assert wait_until(lambda: bool(progress), 20), "no progress arrived"
    delete_queue(settings, job.queue_name(QueueKind.PROGRESS))
    result = any_client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 4}
