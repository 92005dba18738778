"""A caller for the load test: submits jobs (or reconnects to another caller's), logs every event.

Usage: load_client.py submit COUNT TTL LOG  |  load_client.py reconnect IN_LOG LOG
Each line of LOG is ``submitted <id>`` or ``result <id> <status>``, flushed at once, so a
SIGKILL loses nothing that was written.
"""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path

from ebb import Job, JobClient, JobQueuesExpiredError, JobResult


def main() -> None:
    mode, log_path = sys.argv[1], sys.argv[-1]
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - kept open until the process dies

    def write(line: str) -> None:
        with lock:
            log.write(line + "\n")
            log.flush()

    def on_finished(job: Job, result: JobResult) -> None:
        write(f"result {job.id} {result.status.value}")

    with JobClient() as client:
        if mode == "submit":
            count, ttl = int(sys.argv[2]), float(sys.argv[3])
            jobs = []
            for _ in range(count):
                seconds = random.choice((0.05, 0.1, 0.3))
                job = client.submit_job(
                    "demo.sleep",
                    {"seconds": seconds, "steps": 2},
                    on_finished=on_finished,
                    on_progress=lambda j, p: None,
                    auto_cleanup_after_ttl=ttl,
                )
                write(f"submitted {job.id}")
                jobs.append(job)
        else:
            lines = Path(sys.argv[2]).read_text().split("\n")
            done = {line.split()[1] for line in lines if line.startswith("result ")}
            pending = [
                line.split()[1]
                for line in lines
                if line.startswith("submitted ") and line.split()[1] not in done
            ]
            jobs = []
            for job_id in pending:
                try:
                    jobs.append(client.connect_to_submitted_job(job_id, on_finished=on_finished))
                except JobQueuesExpiredError:
                    write(f"expired {job_id}")
        for job in jobs:
            client.wait(job, timeout=120)
    write("done")


if __name__ == "__main__":
    main()
