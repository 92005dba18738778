"""Flower, for real: authenticated, fed by the workers' events, checked via its API and in a browser."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kombu.connection import Connection

from ebb import JobClient, JobStatus
from ebb.config import Settings
from tests.support import ROOT, start_worker, stop_worker, wait_until

ARTIFACTS = Path(os.environ.get("EBB_TEST_ARTIFACTS", os.path.join(ROOT, "artifacts")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def flower(worker: Path, tmp_path: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    """``celery -A tasks flower`` on a free local port, behind basic auth taken from the environment."""
    user, password = "ops", secrets.token_urlsafe(12)
    port = _free_port()
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT,
        env={**os.environ, "FLOWER_BASIC_AUTH": f"{user}:{password}"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/healthcheck", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        assert wait_until(up, 30), (tmp_path / "flower.log").read_text()
        yield url, (user, password)
    finally:
        proc.terminate()
        proc.wait(20)


def _tasks(url: str, auth: tuple[str, str]) -> dict[str, Any]:
    data = requests.get(f"{url}/api/tasks", auth=auth, timeout=10).json()
    assert isinstance(data, dict)
    return data


def test_flower_shows_jobs_with_their_states(
    settings: Settings, client: JobClient, flower: tuple[str, tuple[str, str]]
) -> None:
    url, auth = flower
    assert requests.get(f"{url}/api/tasks", timeout=10).status_code == 401, "Flower must require auth"
    assert requests.get(f"{url}/api/workers", auth=auth, timeout=10).ok

    # Workers send events only while someone watches: Flower turns them on by remote control.
    def watched() -> bool:
        probe = client.submit_job("demo.echo", {"probe": True})
        client.wait(probe, timeout=30)
        return wait_until(lambda: _tasks(url, auth).get(str(probe.id), {}).get("state") == "SUCCESS", 2)

    assert wait_until(watched, 40), "Flower never turned the workers' events on"

    ok = client.submit_job("demo.echo", {"blob": "x" * 100_000})  # large input: never in Flower
    failed = client.submit_job("demo.fail", {"message": "shown in Flower"})
    running = client.submit_job("demo.sleep", {"seconds": 20, "steps": 20}, on_progress=lambda j, p: None)
    late = client.submit_job("demo.stubborn", {"seconds": 30}, job_timeout=1)
    assert client.wait(ok, timeout=30).succeeded
    assert client.wait(failed, timeout=30).status is JobStatus.ERROR

    def states() -> dict[str, str]:
        return {k: v["state"] for k, v in _tasks(url, auth).items()}

    assert wait_until(lambda: states().get(str(running.id)) == "PROGRESS", 20), states()
    assert wait_until(
        lambda: states().get(str(ok.id)) == "SUCCESS" and states().get(str(failed.id)) == "FAILURE", 20
    ), states()
    tasks = _tasks(url, auth)
    # Each job is listed under its workflow's name (the task's shadow name), not as ebb.run_job.
    assert tasks[str(ok.id)]["name"] == "demo.echo"
    assert tasks[str(failed.id)]["name"] == "demo.fail" and tasks[str(running.id)]["name"] == "demo.sleep"
    assert tasks[str(ok.id)]["args"] == repr(("demo.echo", str(ok.id)))
    assert "xxxx" not in str(tasks[str(ok.id)])
    assert "ended ERROR" in tasks[str(failed.id)]["exception"]
    # CANCELLED and TIMEOUT are states of their own in Flower, not FAILURE.
    client.cancel_job(running)
    assert client.wait(running, timeout=15).status is JobStatus.CANCELLED
    assert client.wait(late, timeout=20).status is JobStatus.TIMEOUT
    assert wait_until(
        lambda: states().get(str(running.id)) == "CANCELLED" and states().get(str(late.id)) == "TIMEOUT", 15
    ), states()
    tasks = _tasks(url, auth)
    assert "ended CANCELLED" in tasks[str(running.id)]["exception"]
    assert (
        "ended TIMEOUT" in tasks[str(late.id)]["exception"] and tasks[str(late.id)]["name"] == "demo.stubborn"
    )
    cancelled = requests.get(f"{url}/api/tasks", params={"state": "CANCELLED"}, auth=auth, timeout=10).json()
    assert str(running.id) in cancelled and str(late.id) not in cancelled
    by_workflow = requests.get(f"{url}/api/tasks", params={"taskname": "demo.fail"}, auth=auth, timeout=10)
    assert list(by_workflow.json()) == [str(failed.id)]

    # The audit runs as a Celery task too, so Flower lists its runs.
    from tasks.app import app

    audit_id = str(uuid.uuid4())
    app.send_task("ebb.audit_queues", task_id=audit_id, queue=settings.task_queue)
    assert wait_until(lambda: states().get(audit_id) == "SUCCESS", 30)
    assert _tasks(url, auth)[audit_id]["name"] == "ebb.audit_queues"

    _check_tasks_page_in_chromium(
        url,
        auth,
        {str(ok.id): ("demo.echo", "SUCCESS"), str(failed.id): ("demo.fail", "FAILURE")}
        | {str(running.id): ("demo.sleep", "CANCELLED"), str(late.id): ("demo.stubborn", "TIMEOUT")},
    )


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium package is needed for this test (.ci/run installs it)"
    return found


def _check_tasks_page_in_chromium(url: str, auth: tuple[str, str], jobs: dict[str, tuple[str, str]]) -> None:
    """Flower's tasks page, rendered by headless Chromium: each job's row shows workflow and state."""
    page = url.replace("http://", f"http://{auth[0]}:{auth[1]}@") + "/tasks"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--virtual-time-budget=10000",
    ]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [_chromium(), *flags, f"--user-data-dir={profile}", "--dump-dom", page],
            capture_output=True,
            text=True,
            timeout=90,
        ).stdout
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                _chromium(),
                *flags,
                f"--user-data-dir={profile}",
                "--window-size=1600,1000",
                f"--screenshot={ARTIFACTS / 'flower-tasks.png'}",
                page,
            ],
            capture_output=True,
            timeout=90,
        )
    assert "Tasks" in dom
    missing = [job_id for job_id in jobs if job_id not in dom]
    assert not missing, f"job ids not on Flower's tasks page: {missing}"
    rows = {row.split("</tr>")[0] for row in dom.split("<tr")[1:]}
    for job_id, (workflow, state) in jobs.items():
        row = next(r for r in rows if job_id in r)
        assert workflow in row and state in row, f"row of {job_id} lacks {workflow}/{state}: {row[:400]}"
    assert (ARTIFACTS / "flower-tasks.png").stat().st_size > 10_000


def test_workers_send_no_task_events_while_nobody_watches(settings: Settings, tmp_path: Path) -> None:
    """Celery events cost the broker per job: without Flower (or EBB_TASK_EVENTS) workers send none."""
    queue = f"{settings.task_queue}.quiet.{uuid.uuid4().hex[:6]}"
    proc = start_worker(tmp_path / "worker.log", "-c", "1", env={"EBB_TASK_QUEUE": queue})
    quiet = dataclasses.replace(settings, task_queue=queue)
    try:
        with Connection(settings.broker_url) as conn:
            channel = conn.channel()
            listen = channel.queue_declare(exclusive=True, auto_delete=True).queue
            channel.exchange_declare("celeryev", "topic", durable=True, auto_delete=False)
            channel.queue_bind(listen, "celeryev", "task.#")
            seen: list[str] = []
            channel.basic_consume(
                listen, no_ack=True, callback=lambda m: seen.append(m.delivery_info["routing_key"])
            )
            with JobClient(settings=quiet) as client:
                job = client.submit_job("demo.echo", {"n": 1}, on_progress=lambda j, p: None)
                assert client.wait(job, timeout=30).succeeded
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)
        assert "task.sent" in seen, seen  # the caller still announces what it sent
        assert not [key for key in seen if key != "task.sent"], seen
    finally:
        stop_worker(proc)
        with JobClient(settings=settings) as cleanup:
            cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete(queue))
