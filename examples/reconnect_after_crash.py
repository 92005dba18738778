"""Survive a crash: submit, die without a goodbye, reconnect from a new process, get the result.

python examples/reconnect_after_crash.py submit job.json     # prints the job id, then "crashes"
python examples/reconnect_after_crash.py reconnect job.json  # receives what waited
"""

import os
import sys
from pathlib import Path

from ebb import Job, JobClient, JobQueuesExpiredError

command, path = sys.argv[1], Path(sys.argv[2])

if command == "submit":
    client = JobClient()
    job = client.submit_job("demo.sleep", {"seconds": 2, "steps": 2}, on_progress=lambda j, p: None)
    path.write_text(job.to_json())  # all a later process needs
    print("submitted", job.id)
    os._exit(0)  # a crash: no close(), the broker just sees the connection drop; the TTL starts

with JobClient() as client:
    try:
        job = client.connect_to_submitted_job(
            Job.from_json(path.read_text()),
            on_progress=lambda j, p: print(f"progress {p.progress:.0%} (waited for us)"),
            on_finished=lambda j, r: print("finished", r.status.value, r.output),
        )
    except JobQueuesExpiredError as exc:  # came back after the TTL
        print(exc)
        sys.exit(3)
    client.wait(job, timeout=60)
