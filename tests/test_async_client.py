"""What only an asyncio caller can do: many jobs awaited at once, a cancelled wait, slow coroutines.

These use ``AsyncJobClient`` directly, each test body a coroutine under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from ebb import Job, JobClient, JobResult, JobStatus, ProgressUpdate
from ebb.aio import AsyncJobClient
from ebb.config import Settings
from ebb.contract import QueueKind
from tests.support import Management, wait_until

IN_FLIGHT = 1_000


def test_a_thousand_jobs_in_flight_from_one_client(
    settings: Settings, worker: Path, management: Management
) -> None:
    finished: Counter[uuid.UUID] = Counter()

    async def on_finished(job: Job, result: JobResult) -> None:
        finished[job.id] += 1

    async def main() -> tuple[list[Job], list[JobResult]]:
        async with AsyncJobClient(settings=settings) as client:
            jobs = await asyncio.gather(
                *(client.submit_job("demo.echo", {"n": i}, on_finished=on_finished) for i in range(IN_FLIGHT))
            )
            results = await asyncio.gather(*(client.wait(job, timeout=120) for job in jobs))
            return jobs, results

    jobs, results = asyncio.run(main())
    assert len({job.id for job in jobs}) == IN_FLIGHT
    assert [r.status for r in results] == [JobStatus.SUCCEEDED] * IN_FLIGHT
    assert [r.output for r in results] == [{"n": i} for i in range(IN_FLIGHT)]
    assert [r.job_id for r in results] == [job.id for job in jobs]
    assert finished == Counter({job.id: 1 for job in jobs}), "a result arrived twice, or not at all"
    ours = {str(job.id) for job in jobs}
    assert wait_until(
        lambda: not {name.split(".")[1] for name in management.all_job_queue_names()} & ours, 15
    ), "job queues were left behind"


def test_a_cancelled_wait_leaves_the_job_to_a_later_wait(settings: Settings, worker: Path) -> None:
    async def main() -> JobResult:
        async with AsyncJobClient(settings=settings) as client:
            job = await client.submit_job("demo.sleep", {"seconds": 1.5, "steps": 1})
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):  # the caller gives up on this wait, not on the job
                    await client.wait(job)
            return await client.wait(job, timeout=30)

    result = asyncio.run(main())
    assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 1.5}


@pytest.mark.parametrize("later", ["async", "sync"])
def test_a_cancelled_wait_never_loses_the_job(
    settings: Settings, worker: Path, management: Management, later: str
) -> None:
    """The wait is cancelled and the client closed: the job goes on, and a new client gets the result."""

    async def submit_and_give_up() -> Job:
        async with AsyncJobClient(settings=settings) as client:
            job = await client.submit_job(
                "demo.sleep", {"seconds": 1.5, "steps": 3}, on_progress=lambda j, p: None
            )
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await client.wait(job)
            return job

    job = asyncio.run(submit_and_give_up())
    assert wait_until(
        lambda: (management.job_queues(job.id).get(QueueKind.RESULT) or {}).get("messages") == 1, 20
    ), "the job did not go on after its wait was cancelled"
    progress: list[float] = []

    async def reconnect() -> JobResult:
        async with AsyncJobClient(settings=settings) as client:
            await client.connect_to_submitted_job(job, on_progress=lambda j, p: progress.append(p.progress))
            return await client.wait(job, timeout=30)

    if later == "async":
        result = asyncio.run(reconnect())
    else:
        with JobClient(settings=settings) as sync_client:
            sync_client.connect_to_submitted_job(job, on_progress=lambda j, p: progress.append(p.progress))
            result = sync_client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 1.5}
    assert progress, "the progress that waited was not delivered"
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def test_a_slow_coroutine_callback_holds_up_no_other_job(settings: Settings, worker: Path) -> None:
    async def main() -> tuple[float, float, JobResult, list[str]]:
        events: list[str] = []
        slow_started = asyncio.Event()

        async def slow_progress(job: Job, update: ProgressUpdate) -> None:
            slow_started.set()
            await asyncio.sleep(5)
            events.append(f"progress {update.progress}")

        async def on_finished(job: Job, result: JobResult) -> None:
            events.append("finished")

        async with AsyncJobClient(settings=settings) as client:
            slow = await client.submit_job(
                "demo.sleep", {"seconds": 0.1, "steps": 1}, on_progress=slow_progress, on_finished=on_finished
            )
            async with asyncio.timeout(15):
                await slow_started.wait()
            started = time.monotonic()
            quick = await client.submit_job("demo.echo", {"n": 1}, on_status=lambda j, s: None)
            quick_result = await client.wait(quick, timeout=10)
            quick_took = time.monotonic() - started
            slow_result = await client.wait(slow, timeout=30)
            slow_took = time.monotonic() - started
        assert quick_result.output == {"n": 1}
        return quick_took, slow_took, slow_result, events

    quick_took, slow_took, slow_result, events = asyncio.run(main())
    assert quick_took < 2, f"job B waited {quick_took:.1f} s behind job A's callback"
    assert slow_result.succeeded
    assert slow_took >= 4.5, "job A's result was delivered before its progress callback ended"
    assert events == ["progress 1.0", "finished"]
