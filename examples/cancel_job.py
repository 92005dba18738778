"""Cancel a running job: the caller receives status CANCELLED and a CANCELLED result.

python examples/cancel_job.py
"""

import time

from ebb import JobClient, JobStatus

with JobClient() as client:
    statuses: list[JobStatus] = []
    job = client.submit_job(
        "demo.sleep", {"seconds": 60, "steps": 60}, on_status=lambda j, s: statuses.append(s.status)
    )
    while JobStatus.RUNNING not in statuses:
        time.sleep(0.1)
    client.cancel_job(job)
    result = client.wait(job, timeout=30)
    print("result", result.status.value, "statuses", [s.value for s in statuses])
