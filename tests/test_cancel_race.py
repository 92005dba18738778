"""A cancel that lands while the workflow publishes progress still reaches the caller.

The interrupt (SIGUSR2, tasks/interrupt.py) used to be raised wherever the workflow's thread
was, inside py-amqp's socket I/O too when a progress report was going out. The worker's reply
connection was then left mid-frame and the job's final CANCELLED status waited on it forever:
``job_interrupting`` logged, no result. In the field a fresh worker process made it likely (its
watcher polls in step with demo.sleep's whole-second reports); here ``demo.sleep`` with
``seconds: 0`` publishes progress back to back, so nearly every cancel lands mid-publish.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebb import JobClient, JobStatus
from ebb.config import Settings
from tests.support import private_worker, wait_until

ROUNDS = 8
#: One publish with its confirm takes about a millisecond: the job would run for seconds.
BACK_TO_BACK = {"seconds": 0, "steps": 10_000}


@pytest.fixture
def fresh_worker(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A worker of its own, started for this test: one pool process, on a private task queue."""
    with private_worker(settings, tmp_path / "worker.log", "-c", "1", name="cancel") as private:
        yield private


def cancel_as_it_reports(client: JobClient) -> None:
    """Cancel a job that is publishing progress; its CANCELLED result must come, and soon."""
    progress: list[int] = []
    statuses: list[JobStatus] = []
    job = client.submit_job(
        "demo.sleep",
        BACK_TO_BACK,
        on_progress=lambda j, p: progress.append(p.seq),
        on_status=lambda j, s: statuses.append(s.status),
    )
    assert wait_until(lambda: len(progress) >= 1, 15)
    started = time.monotonic()
    client.cancel_job(job)
    result = client.wait(job, timeout=10)  # the watcher sees the cancel within 0.5 s
    assert result.status is JobStatus.CANCELLED
    assert time.monotonic() - started < 5
    assert statuses == [JobStatus.RUNNING, JobStatus.CANCELLED]
    assert len(progress) < BACK_TO_BACK["steps"], "the job ended before the cancel: no race"


def test_cancel_during_progress_publishing_delivers_cancelled(fresh_worker: Settings) -> None:
    with JobClient(settings=fresh_worker) as client:
        for _ in range(ROUNDS):  # one pool process throughout: a lost result hangs the rest too
            cancel_as_it_reports(client)
