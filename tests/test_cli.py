"""The ``ebb`` command line, run as a user would run it, with its exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support import ROOT, Management, ctrl_c_reaches_children, wait_until

EBB = [sys.executable, "-m", "ebb.cli"]


def ebb(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EBB, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_submit_follows_the_job_to_its_result(worker: Path, management: Management) -> None:
    out = ebb("submit", "demo.sleep", "--param", "seconds=.4", "-p", "steps=2", "--ttl", "10m", "--json")
    assert out.returncode == 0, out.stderr
    events = json_lines(out.stdout)
    # The job's own line first and its result last; status and progress come from queues of their
    # own, so they interleave as they arrive, each in its order.
    assert events[0]["event"] == "submitted" and events[-1]["event"] == "result"
    assert [e["status"] for e in events if e["event"] == "status"] == ["RUNNING", "SUCCEEDED"]
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    assert len(progress) == 2 and progress == sorted(progress)
    assert events[0]["job"]["ttl"] == 600.0
    assert events[-1]["status"] == "SUCCEEDED" and events[-1]["output"] == {"slept": 0.4}
    assert not management.job_queues(uuid.UUID(events[0]["job_id"]))


def test_exit_codes(worker: Path, tmp_path: Path) -> None:
    failed = ebb("submit", "demo.fail", "-p", "message=boom", "--json")
    assert failed.returncode == 1 and json_lines(failed.stdout)[-1]["error"] == "RuntimeError: boom"
    unknown_workflow = ebb("submit", "no.such.thing")
    assert unknown_workflow.returncode == 2 and "demo.sleep" in unknown_workflow.stderr
    assert ebb("submit", "demo.echo", "--ttl", "soon").returncode == 2
    assert ebb("submit", "demo.echo", "--param", "novalue").returncode == 2
    assert ebb("submit", "demo.echo", "--ttl", "30d").returncode == 2  # above EBB_MAX_TTL
    gone = ebb("watch", str(uuid.uuid4()))
    assert gone.returncode == 3 and "no longer exists" in gone.stderr
    assert ebb("status", str(uuid.uuid4())).returncode == 3
    assert ebb("status", "not-a-uuid").returncode == 2
    down = ebb("submit", "demo.echo", env={"EBB_BROKER_URL": "amqp://guest:guest@127.0.0.1:5999//"})
    assert down.returncode == 4 and "EBB_BROKER_URL" in down.stderr
    # Typed params: -p values take the schema's types, and a bad one is bad input naming its field.
    bad = ebb("submit", "demo.sleep", "-p", "seconds=abc", "--json")
    assert bad.returncode == 2 and "parameter 'seconds' = 'abc': expected number" in bad.stderr
    assert json.loads(bad.stdout)["exit_code"] == 2
    assert "'steps' = '2.5': expected integer" in ebb("submit", "demo.sleep", "-p", "steps=2.5").stderr
    typo = ebb("submit", "demo.sleep", "-p", "secnds=1")
    assert typo.returncode == 2 and "no parameter 'secnds' (it takes: seconds, steps)" in typo.stderr
    params = tmp_path / "params.json"
    params.write_text('{"seconds": 0.1, "steps": 1}')
    assert ebb("submit", "demo.sleep", "--params-file", str(params)).returncode == 0


def test_ctrl_c_detaches_and_watch_reconnects(worker: Path, management: Management) -> None:
    with ctrl_c_reaches_children():
        proc = subprocess.Popen(
            [*EBB, "submit", "demo.sleep", "-p", "seconds=3", "-p", "steps=3", "--ttl", "2m", "--json"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert proc.stdout is not None
    submitted = json.loads(proc.stdout.readline())
    assert json.loads(proc.stdout.readline())["status"] == "RUNNING"
    proc.send_signal(signal.SIGINT)
    _rest, err = proc.communicate(timeout=20)
    assert proc.returncode == 5
    assert f"ebb watch {submitted['job_id']}" in err
    job_id = uuid.UUID(submitted["job_id"])
    assert management.job_queues(job_id), "detaching must keep the queues"
    watched = ebb("watch", str(job_id), "--json")
    assert watched.returncode == 0, watched.stderr
    assert json_lines(watched.stdout)[-1]["status"] == "SUCCEEDED"
    assert wait_until(lambda: not management.job_queues(job_id), 10)


def test_detach_status_cancel_and_workflows(worker: Path) -> None:
    detached = ebb("submit", "demo.sleep", "-p", "seconds=30", "-p", "steps=30", "--detach", "--ttl", "1m")
    assert detached.returncode == 0
    job_id = detached.stdout.strip()
    assert wait_until(lambda: json.loads(ebb("status", job_id, "--json").stdout)["status"] == "RUNNING", 15)
    assert ebb("cancel", job_id).returncode == 0
    assert wait_until(lambda: json.loads(ebb("status", job_id, "--json").stdout)["status"] == "CANCELLED", 15)
    watched = ebb("watch", job_id, "--json")
    assert watched.returncode == 1 and json_lines(watched.stdout)[-1]["status"] == "CANCELLED"
    listed = json.loads(ebb("workflows", "--json").stdout)
    assert {"demo.sleep", "demo.fail", "demo.echo"} <= {w["name"] for w in listed}
    sleep = next(w for w in listed if w["name"] == "demo.sleep")
    assert sleep["schema"]["properties"]["seconds"]["type"] == "number"  # --json: the JSON Schema
    table = ebb("workflows").stdout.splitlines()
    at = table.index(next(line for line in table if line.startswith("demo.sleep ")))
    assert table[at + 1].split()[:4] == ["seconds", "number", ">=", "0"]
    assert "default 1.0" in table[at + 1] and "How long to sleep in all" in table[at + 1]
    assert table[at + 2].split()[:2] == ["steps", "integer"] and "default 1" in table[at + 2]
    assert "params: any (untyped)" in next(
        line
        for line in table[table.index(next(line for line in table if line.startswith("demo.echo "))) + 1 :]
    )
    started = time.monotonic()
    assert ebb("status", job_id).stdout.startswith(f"job {job_id} (demo.sleep) finished CANCELLED")
    assert time.monotonic() - started < 10
