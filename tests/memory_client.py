"""A long-lived caller for the memory test: runs jobs on one client, prints RSS at checkpoints.

``memory_client.py [--async] JOBS WINDOW CHECKPOINT...``: submits ``demo.echo`` jobs, ``WINDOW``
in flight at a time, every fifth with all three callbacks, and prints ``jobs rss_bytes`` after
each checkpoint (garbage collected first), then one line of JSON with the client's bookkeeping.
With ``--async`` the caller is an ``AsyncJobClient`` under ``asyncio.run``: each window is
submitted with ``asyncio.gather`` and waited for the same way (``on_finished`` a coroutine, the
progress and status callbacks plain functions, so both ways of running a callback are used).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from typing import Any

import aiormq

from ebb import Job, JobClient, JobResult
from ebb.aio import AsyncJobClient
from ebb.core import STRAGGLER_GRACE


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_sync(jobs: int, window: int, checkpoints: set[int]) -> dict[str, Any]:
    results: list[JobResult] = []
    with JobClient() as client:
        done = 0
        while done < jobs:
            batch: list[Job] = []
            for i in range(min(window, jobs - done)):
                updates = (done + i) % 5 == 0
                batch.append(
                    client.submit_job(
                        "demo.echo",
                        {"n": done + i},
                        on_finished=lambda j, r: results.append(r),
                        on_progress=(lambda j, p: None) if updates else None,
                        on_status=(lambda j, s: None) if updates else None,
                    )
                )
            for job in batch:
                assert client.wait(job, timeout=60).succeeded
            done += len(batch)
            results.clear()
            if done in checkpoints:
                gc.collect()
                print(done, rss_bytes(), flush=True)
        channel = client._consume_channel
        return {
            "watches": len(client._core.watches),
            "finished_kept": len(client._core.finished),
            "consumer_callbacks": len(channel.callbacks),
            "cancel_callbacks": len(channel.cancel_callbacks),
        }


async def run_async(jobs: int, window: int, checkpoints: set[int]) -> dict[str, Any]:
    results: list[JobResult] = []

    async def on_finished(job: Job, result: JobResult) -> None:
        results.append(result)

    async with AsyncJobClient() as client:
        done = 0
        while done < jobs:
            count = min(window, jobs - done)
            batch = await asyncio.gather(
                *(
                    client.submit_job(
                        "demo.echo",
                        {"n": done + i},
                        on_finished=on_finished,
                        on_progress=(lambda j, p: None) if (done + i) % 5 == 0 else None,
                        on_status=(lambda j, s: None) if (done + i) % 5 == 0 else None,
                    )
                    for i in range(count)
                )
            )
            outcomes = await asyncio.gather(*(client.wait(job, timeout=60) for job in batch))
            assert all(result.succeeded for result in outcomes)
            done += count
            results.clear()
            if done in checkpoints:
                gc.collect()
                print(done, rss_bytes(), flush=True)
        # A result that overtook its progress starts a straggler timer, which runs out by itself
        # (STRAGGLER_GRACE) even when the stragglers came: once it has, no task may be left.
        await asyncio.sleep(STRAGGLER_GRACE + 0.5)
        channel = client._consume_channel
        assert isinstance(channel, aiormq.Channel)
        return {
            "watches": len(client._core.watches),
            "finished_kept": len(client._core.finished),
            "consumer_callbacks": len(channel.consumers),
            "tasks_besides_the_supervisor": len(client._tasks) - 1,
        }


def main() -> None:
    args = sys.argv[1:]
    use_async = "--async" in args
    args = [a for a in args if a != "--async"]
    jobs, window = int(args[0]), int(args[1])
    checkpoints = {int(c) for c in args[2:]}
    if use_async:
        books = asyncio.run(run_async(jobs, window, checkpoints))
    else:
        books = run_sync(jobs, window, checkpoints)
    print(json.dumps(books), flush=True)


if __name__ == "__main__":
    main()
