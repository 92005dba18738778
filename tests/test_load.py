"""Several callers, a few hundred jobs, callers killed and reconnected at random: nothing lost or doubled."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from ebb import JobClient
from ebb.config import Settings
from tests.support import ROOT, Management, wait_until

CALLERS = 4
JOBS_PER_CALLER = 60
TTL = 20.0


def spawn(*args: str) -> subprocess.Popen[bytes]:
    """A load client; what it prints goes next to its log (``<log>.err``), for a failure's story."""
    with open(f"{args[-1]}.err", "wb") as errors:
        return subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "load_client.py"), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )


def events(log: Path) -> list[tuple[str, ...]]:
    return [tuple(line.split()) for line in log.read_text().splitlines() if line]


def test_callers_killed_and_reconnected_at_random(
    settings: Settings, worker: Path, management: Management, tmp_path: Path
) -> None:
    rng = random.Random(20261128)
    logs = [tmp_path / f"caller{i}.log" for i in range(CALLERS)]
    callers = [spawn("submit", str(JOBS_PER_CALLER), str(TTL), str(log)) for log in logs]
    # Killed mid-submission, not before it began: a loaded machine took over 2 s to start one.
    assert wait_until(lambda: all(log.exists() and "submitted" in log.read_text() for log in logs), 60)
    time.sleep(rng.uniform(2.0, 4.0))
    doomed = rng.sample(range(CALLERS), 2)
    for i in doomed:
        callers[i].kill()  # SIGKILL, mid-submission or mid-wait
        callers[i].wait(10)
    # One dead caller's jobs are picked up by a new process; the other's are abandoned to their TTL.
    revived = doomed[0]
    rescue_log = tmp_path / "rescue.log"
    rescuer = spawn("reconnect", str(logs[revived]), str(rescue_log))
    for i, proc in enumerate(callers):
        if i not in doomed:
            assert proc.wait(180) == 0, f"caller {i} failed: " + Path(f"{logs[i]}.err").read_text()[-3000:]
    assert rescuer.wait(180) == 0, Path(f"{rescue_log}.err").read_text()[-3000:]

    all_jobs: set[str] = set()
    for i, log in enumerate(logs):
        lines = events(log)
        submitted = [e[1] for e in lines if e[0] == "submitted"]
        results = Counter(e[1] for e in lines if e[0] == "result")
        all_jobs |= set(submitted)
        if i not in doomed:
            assert len(submitted) == JOBS_PER_CALLER
            assert results == Counter(submitted), f"caller {i}: a result missing or delivered twice"
            assert ("done",) in lines
    rescued = Counter(e[1] for e in events(rescue_log) if e[0] == "result")
    revived_lines = events(logs[revived])
    pending = {e[1] for e in revived_lines if e[0] == "submitted"} - {
        e[1] for e in revived_lines if e[0] == "result"
    }
    assert set(rescued) == pending and all(n == 1 for n in rescued.values())

    # Every job that reached the broker has exactly one outcome in the registry.
    with JobClient(settings=settings) as client:
        assert wait_until(lambda: all(client.job_status(j).finished_at for j in all_jobs), 60)
        statuses = Counter(client.job_status(j).status for j in all_jobs)
    assert statuses == Counter({"SUCCEEDED": len(all_jobs)})
    assert len(all_jobs) >= 2 * JOBS_PER_CALLER

    # Nothing stays on the broker but the killed callers' queues, and those expire on their TTL:
    # the abandoned caller's, and any the revived one was killed deleting (its result received).
    left_to_ttl = {e[1] for i in doomed for e in events(logs[i]) if e[0] == "submitted"}
    others = all_jobs - left_to_ttl
    assert all(not management.job_queues(uuid.UUID(j)) for j in others)
    assert wait_until(lambda: all(not management.job_queues(uuid.UUID(j)) for j in left_to_ttl), TTL + 30)
