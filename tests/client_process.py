"""A caller that submits one job, prints its JSON and every callback, then waits to be killed."""

from __future__ import annotations

import json
import sys
import threading
import time

from ebb import JobClient

_lock = threading.Lock()


def say(line: str) -> None:
    """One whole line per event; the job's JSON always comes first."""
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main() -> None:
    workflow, params, ttl, callbacks = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    client = JobClient()
    extra = {}
    if callbacks == "all":
        extra = {
            "on_progress": lambda job, p: say(f"progress {p.progress}"),
            "on_status": lambda job, s: say(f"status {s.status.value}"),
        }
    _lock.acquire()  # callbacks wait until the job's JSON is out
    job = client.submit_job(
        workflow,
        params,
        on_finished=lambda job, r: say(f"finished {r.status.value}"),
        auto_cleanup_after_ttl=ttl,
        **extra,  # type: ignore[arg-type]
    )
    sys.stdout.write(job.to_json() + "\n")
    sys.stdout.flush()
    _lock.release()
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
