"""A long-lived caller for the memory test: runs jobs on one client, prints RSS at checkpoints.

``memory_client.py JOBS WINDOW CHECKPOINT...``: submits ``demo.echo`` jobs, ``WINDOW`` in flight
at a time, every fifth with all three callbacks, and prints ``jobs rss_bytes`` after each
checkpoint (garbage collected first), then one line of JSON with the client's bookkeeping.
"""

from __future__ import annotations

import gc
import json
import sys

from ebb import Job, JobClient, JobResult


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    jobs, window = int(sys.argv[1]), int(sys.argv[2])
    checkpoints = {int(c) for c in sys.argv[3:]}
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
        print(
            json.dumps(
                {
                    "watches": len(client._watches),
                    "finished_kept": len(client._finished),
                    "consumer_callbacks": len(channel.callbacks),
                    "cancel_callbacks": len(channel.cancel_callbacks),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
