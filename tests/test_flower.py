"""Flower, for real: authenticated, fed by the workers' events, checked via its API and in a browser."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
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

from ebb import JobClient, JobStatus, contract
from ebb.config import Settings
from tests.support import ROOT, free_port, kill_worker, start_worker, stop_worker, wait_until

ARTIFACTS = Path(os.environ.get("EBB_TEST_ARTIFACTS", os.path.join(ROOT, "artifacts")))


@contextlib.contextmanager
def running_flower(log: Path, *options: str) -> Iterator[tuple[str, tuple[str, str]]]:
    """``celery -A tasks flower`` on a free local port, behind basic auth taken from the environment."""
    user, password = "ops", secrets.token_urlsafe(12)
    port = free_port()
    out = log.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            *options,
        ],
        cwd=ROOT,
        env={**os.environ, "FLOWER_BASIC_AUTH": f"{user}:{password}"},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/healthcheck", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        assert wait_until(up, 30), log.read_text()
        yield url, (user, password)
    finally:
        proc.terminate()
        proc.wait(20)
        out.close()


@pytest.fixture
def flower(worker: Path, tmp_path: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    with running_flower(tmp_path / "flower.log") as running:
        yield running


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
    """Celery events cost the broker per job: without Flower (or EBB_TASK_EVENTS) nobody sends any."""
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
        assert seen == [], seen  # nor does the caller (no task-sent: tasks/final_events.py says why)
    finally:
        stop_worker(proc)
        with JobClient(settings=settings) as cleanup:
            cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete(queue))


#: What Flower shows for a job that has not ended.
NOT_ENDED = {"PENDING", "RECEIVED", "STARTED", "PROGRESS", "RETRY"}


@contextlib.contextmanager
def _task_queue(settings: Settings, name: str) -> Iterator[Settings]:
    """A task queue of the test's own, declared before any worker reads it; the callers' settings."""
    queue = f"{settings.task_queue}.{name}.{uuid.uuid4().hex[:6]}"
    with Connection(settings.broker_url) as conn:
        contract.task_queue(queue, settings.task_queue_type)(conn.default_channel).declare()
    try:
        yield dataclasses.replace(settings, task_queue=queue)
    finally:
        with Connection(settings.broker_url) as conn:
            for name in (queue, f"{queue}.audit"):
                conn.default_channel.queue_delete(name)


def _states(url: str, auth: tuple[str, str]) -> dict[str, str]:
    return {job_id: task["state"] for job_id, task in _tasks(url, auth).items()}


def test_flower_started_before_and_after_the_workers_never_shows_a_finished_job_waiting_or_running(
    settings: Settings, tmp_path: Path
) -> None:
    """Jobs queued before any worker, run in a new worker's first seconds, and a Flower started last."""
    with (
        _task_queue(settings, "ghosts") as own,
        running_flower(tmp_path / "first.log") as (first, first_auth),
        # No worker advertises demo.echo yet: the jobs wait for the one started next.
        JobClient(settings=dataclasses.replace(own, check_workflows=False)) as client,
    ):
        queued = [client.submit_job("demo.echo", {"n": n}) for n in range(3)]  # before any worker
        worker = start_worker(tmp_path / "worker.log", "-c", "2", env={"EBB_TASK_QUEUE": own.task_queue})
        try:
            early = [client.submit_job("demo.echo", {"n": n}) for n in range(3)]
            for job in queued + early:  # all in the worker's first seconds, before Flower turns its events on
                assert client.wait(job, timeout=30).succeeded

            def watched() -> bool:
                probe = client.submit_job("demo.echo", {"probe": True})
                client.wait(probe, timeout=30)
                return wait_until(lambda: _states(first, first_auth).get(str(probe.id)) == "SUCCESS", 2)

            assert wait_until(watched, 40), "Flower never turned the worker's events on"
            running = client.submit_job(
                "demo.sleep", {"seconds": 8, "steps": 8}, on_progress=lambda j, p: None
            )
            assert wait_until(lambda: _states(first, first_auth).get(str(running.id)) in NOT_ENDED, 15)
            with running_flower(tmp_path / "last.log") as (last, last_auth):
                assert client.wait(running, timeout=30).succeeded
                closing = client.submit_job("demo.fail", {"message": "the last one"})
                assert client.wait(closing, timeout=30).status is JobStatus.ERROR

                def ended_in_both() -> bool:
                    return all(
                        _states(url, auth).get(str(job.id)) == "FAILURE"
                        for url, auth in ((first, first_auth), (last, last_auth))
                        for job in (closing,)
                    )

                assert wait_until(ended_in_both, 15)
                ended = {str(job.id) for job in (*queued, *early, running, closing)}
                for url, auth in ((first, first_auth), (last, last_auth)):
                    states = _states(url, auth)
                    assert not {j: s for j, s in states.items() if j in ended and s in NOT_ENDED}, states
                    # its real outcome, in the Flower that saw it start and in the one that did not
                    assert states[str(running.id)] == "SUCCESS", states
                # what ran unwatched is not shown at all: neither as waiting nor as done
                assert not {str(job.id) for job in (*queued, *early)} & set(_states(first, first_auth))
        finally:
            stop_worker(worker)


def test_a_job_flower_saw_running_ends_there_when_an_unwatched_worker_runs_it_again(
    settings: Settings, tmp_path: Path
) -> None:
    """Its worker dies; the one that runs it again sends no events (nobody turned them on)."""
    with (
        _task_queue(settings, "rerun") as own,
        # This Flower never turns events on: only the first worker sends them (EBB_TASK_EVENTS).
        running_flower(tmp_path / "flower.log", "--enable_events=False") as (url, auth),
        JobClient(settings=own) as client,
    ):
        watched = start_worker(
            tmp_path / "first.log",
            "-c",
            "1",
            env={"EBB_TASK_QUEUE": own.task_queue, "EBB_TASK_EVENTS": "true"},
        )
        try:
            job = client.submit_job("demo.sleep", {"seconds": 4, "steps": 4}, on_progress=lambda j, p: None)
            assert wait_until(lambda: _states(url, auth).get(str(job.id)) == "PROGRESS", 20)
        finally:
            kill_worker(watched)
        unwatched = start_worker(tmp_path / "second.log", "-c", "1", env={"EBB_TASK_QUEUE": own.task_queue})
        try:
            outcome = client.wait(job, timeout=60)
            assert outcome.succeeded and outcome.attempt == 2, outcome
            assert wait_until(lambda: _states(url, auth).get(str(job.id)) == "SUCCESS", 10), _states(
                url, auth
            )
        finally:
            stop_worker(unwatched)
