"""examples/fastapi_progress.py for real: uvicorn, the session's worker, an SSE stream, a browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ebb import JobClient
from ebb.config import Settings
from tests.support import ROOT, wait_until

ARTIFACTS = Path(os.environ.get("EBB_TEST_ARTIFACTS", os.path.join(ROOT, "artifacts")))
PARAMS = {"seconds": 1, "steps": 4}
JOB = {"workflow": "demo.sleep", "params": PARAMS}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(worker: Path, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``uvicorn examples.fastapi_progress:app`` on a free local port, with the session's task queue."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("uvicorn") / "uvicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "examples.fastapi_progress:app",
                "--host",
                "127.0.0.1",
                f"--port={port}",
            ],
            cwd=ROOT,
            env=os.environ.copy(),  # EBB_TASK_QUEUE: the session's (conftest)
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # died: stop waiting, the assert below says why

    try:
        assert wait_until(up, 30) and proc.poll() is None, log_path.read_text()
        yield url
    finally:
        proc.terminate()  # lifespan shutdown closes the app's AsyncJobClient
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        # Newer uvicorns re-raise SIGTERM after a graceful shutdown: -15 is a clean exit too.
        assert proc.returncode in (0, -signal.SIGTERM), log_path.read_text()
        assert "Application shutdown complete." in log_path.read_text()


def read_events(url: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Read the job's SSE stream to its end: (event name, JSON data) per message."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "", ""
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif line == "" and data:
                events.append((name, json.loads(data)))
                name, data = "", ""
    return events


def check_story(events: list[tuple[str, dict[str, Any]]], *, with_status: bool = True) -> None:
    """RUNNING first, progress 0.25 to 1.0 in order, the result SUCCEEDED last."""
    names = [name for name, _ in events]
    if with_status:
        assert events[0] == ("status", events[0][1]) and events[0][1]["status"] == "RUNNING", events
    assert [d["progress"] for n, d in events if n == "progress"] == [0.25, 0.5, 0.75, 1.0], events
    assert names.count("result") == 1 and names[-1] == "result", names
    assert events[-1][1]["status"] == "SUCCEEDED" and events[-1][1]["output"] == {"slept": 1}
    assert set(names) <= {"status", "progress", "result"}


def test_sse_stream_of_a_job_the_app_submitted(app_url: str) -> None:
    response = httpx.post(f"{app_url}/jobs", json=JOB, timeout=30)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    events = read_events(app_url, job_id)  # ends by itself after the result
    check_story(events)
    assert [d["status"] for n, d in events if n == "status"] == ["RUNNING", "SUCCEEDED"]
    again = httpx.get(f"{app_url}/jobs/{job_id}/events", timeout=30)
    assert again.status_code == 404 and "result was delivered" in again.json()["detail"]


def test_sse_stream_of_a_job_submitted_elsewhere(app_url: str, settings: Settings) -> None:
    """An id the app does not know: it connects to the job first, and gets what waited."""
    with JobClient(settings=settings) as other:
        job = other.submit_job("demo.sleep", PARAMS, on_progress=lambda j, p: None)
        other.disconnect_from_submitted_job(job)  # the queues stay, and fill up
    check_story(read_events(app_url, str(job.id)), with_status=False)  # no status queue
    assert httpx.get(f"{app_url}/jobs/{uuid.uuid4()}/events", timeout=30).status_code == 404


def test_refused_submissions(app_url: str) -> None:
    unknown = httpx.post(f"{app_url}/jobs", json={"workflow": "no.such", "params": {}}, timeout=30)
    assert unknown.status_code == 422 and "known workflows" in unknown.json()["detail"]
    assert httpx.get(f"{app_url}/jobs/not-a-uuid/events", timeout=30).status_code == 422


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium package is needed for this test (.ci/run installs it)"
    return found


def test_page_shows_live_progress_in_chromium(app_url: str) -> None:
    """The page starts a job on load (?autostart=...); after the run its DOM shows the outcome."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--virtual-time-budget=20000",  # virtual time stands still while the SSE stream is open
    ]
    page = f"{app_url}/?autostart=demo.sleep&seconds=1&steps=4"
    screenshot = ARTIFACTS / "fastapi-progress.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [
                _chromium(),
                *flags,
                f"--user-data-dir={profile}",
                "--window-size=900,400",
                f"--screenshot={screenshot}",
                "--dump-dom",
                page,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        ).stdout
    assert '<progress id="bar" value="1" max="1"></progress>' in dom, dom
    assert '<span id="percent">100 %</span>' in dom
    assert '<span id="status">SUCCEEDED</span>' in dom
    assert '<code id="result">SUCCEEDED {"slept":1}</code>' in dom
    assert screenshot.stat().st_size > 10_000
