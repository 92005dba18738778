"""A long-lived caller's memory is bounded by its jobs in flight, not by the jobs it ever ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebb.config import Settings
from tests.support import ROOT

JOBS = 10_000
MEASURE_FROM = 2_000
#: Outcomes a client keeps for a later wait(); the steady state is reached long before MEASURE_FROM.
KEEP = 1_000
#: What each client must hold once every job is done: no job, only the kept outcomes, no consumer.
BOOKS = {
    "sync": {"watches": 0, "finished_kept": KEEP, "consumer_callbacks": 0, "cancel_callbacks": 0},
    "async": {
        "watches": 0,
        "finished_kept": KEEP,
        "consumer_callbacks": 0,
        "tasks_besides_the_supervisor": 0,
    },
}


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.timeout(900)  # 10,000 jobs: several minutes while the other broker's suite runs too
def test_rss_stays_flat_over_ten_thousand_jobs(settings: Settings, worker: Path, kind: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tests", "memory_client.py"),
            *(["--async"] if kind == "async" else []),
            str(JOBS),
            "20",
            str(MEASURE_FROM),
            str(JOBS),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "EBB_KEEP_RESULTS": str(KEEP)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    rss: dict[int, int] = {}
    for line in lines[:2]:
        jobs, size = line.split()
        rss[int(jobs)] = int(size)
    per_job = (rss[JOBS] - rss[MEASURE_FROM]) / (JOBS - MEASURE_FROM)
    print(f"RSS {rss[MEASURE_FROM]} -> {rss[JOBS]} bytes: {per_job:.1f} bytes per job")
    assert per_job < 512, f"the client grows {per_job:.0f} bytes per job"
    books = json.loads(lines[2])
    assert books == BOOKS[kind]
