"""Submit a job, follow it through callbacks, and wait for its result.

Run with a worker going (celery -A tasks worker):  python examples/submit_with_callbacks.py
"""

from datetime import timedelta

from ebb import JobClient

with JobClient() as client:
    job = client.submit_job(
        "demo.sleep",
        {"seconds": 1, "steps": 4},
        on_status=lambda job, s: print("status", s.status.value),
        on_progress=lambda job, p: print(f"progress {p.progress:.0%} {p.message}"),
        on_finished=lambda job, r: print("finished", r.status.value, r.output),
        auto_cleanup_after_ttl=timedelta(hours=1),
    )
    result = client.wait(job, timeout=60)
    result.raise_for_status()  # JobFailedError for ERROR, CANCELLED or TIMEOUT
    print("output", result.output)
