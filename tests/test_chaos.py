"""The short chaos profile (tests/chaos): faults that overlap, checked over the whole history.

One run of about five minutes on a node of its own (the suite's broker version), with two
sync and two asyncio callers, two workers and beat, and every single-node fault kind at least
once. ``EBB_CHAOS_SEED`` picks another schedule; a failure names its seed, and
``python -m tests.chaos.run --profile short --seed N`` replays it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

#: The seed CI runs; any other is one environment variable away.
DEFAULT_SEED = 2026


@pytest.mark.timeout(1200)
def test_short_chaos_profile_finds_no_violation(tmp_path: Path) -> None:
    seed = int(os.environ.get("EBB_CHAOS_SEED", DEFAULT_SEED))
    command = [sys.executable, "-m", "tests.chaos.run", "--profile", "short", "--seed", str(seed)]
    proc = subprocess.Popen(
        [*command, "--dir", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1100)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the run stops what it started (its node, Redis, workers) on SIGTERM
        stdout, stderr = proc.communicate(timeout=120)
    run = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    figures = [line for line in run.stdout.splitlines() if line.startswith("chaos: seed=")]
    print(run.stdout)
    assert figures, (
        f"the chaos run printed no figures (exit {run.returncode}):\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    )
    assert run.returncode == 0, f"seed {seed}: {figures[-1]}\n{run.stdout[-4000:]}"
    assert " violations=0" in figures[-1]
    assert "jobs=0 " not in figures[-1], "the run submitted nothing: it tested nothing"
