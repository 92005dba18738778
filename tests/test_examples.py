"""The README's examples run as they are."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ebb import InvalidParamsError, JobClient, JobStatus
from ebb.config import Settings
from tests.support import ROOT, start_worker, stop_worker


def run_example(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def test_submit_with_callbacks(worker: Path) -> None:
    out = run_example("examples/submit_with_callbacks.py")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "status RUNNING"
    assert "progress 100% step 4/4" in lines
    assert lines[-1] == "output {'slept': 1.0}"


def test_reconnect_after_crash(worker: Path, tmp_path: Path) -> None:
    saved = tmp_path / "job.json"
    first = run_example("examples/reconnect_after_crash.py", "submit", str(saved))
    assert first.returncode == 0 and first.stdout.startswith("submitted")
    second = run_example("examples/reconnect_after_crash.py", "reconnect", str(saved))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == "finished SUCCEEDED {'slept': 2.0}"


def test_cancel_job(worker: Path) -> None:
    out = run_example("examples/cancel_job.py")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "result CANCELLED statuses ['RUNNING', 'CANCELLED']"


def test_own_workflow_module(settings: Settings, tmp_path: Path) -> None:
    queue = f"{settings.task_queue}.examples.{uuid.uuid4().hex[:6]}"
    proc = start_worker(
        tmp_path / "worker.log",
        env={"EBB_TASK_QUEUE": queue, "EBB_WORKFLOW_MODULES": "examples.my_workflows"},
    )
    try:
        with JobClient(settings=Settings(**{**settings.__dict__, "task_queue": queue})) as client:
            assert "examples.word_count" in {w.name for w in client.list_workflows()}
            job = client.submit_job(
                "examples.word_count", {"text": "a b\nb c"}, on_progress=lambda j, p: None
            )
            result = client.wait(job, timeout=30)
            assert result.status is JobStatus.SUCCEEDED
            assert result.output == {"a": 1, "b": 2, "c": 1}
            # The typed one: defaults filled in, a model back as JSON, bad input refused up front.
            report = client.submit_job("reports.build", {"title": "Q3 Sales", "pages": 2, "window": "PT1H"})
            built = client.wait(report, timeout=30)
            assert built.output == {"file": "q3-sales.pdf", "pages": 2, "covers_seconds": 3600.0}
            with pytest.raises(
                InvalidParamsError, match="'format' = 'doc': expected one of \"pdf\", \"csv\""
            ):
                client.submit_job("reports.build", {"title": "Q3", "format": "doc"})
            with pytest.raises(InvalidParamsError, match="'title' = <missing>"):
                client.submit_job("reports.build", {})
    finally:
        stop_worker(proc)
        with JobClient(settings=settings) as cleanup:
            cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete(queue))
