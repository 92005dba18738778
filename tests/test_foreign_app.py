"""Ebb jobs on a foreign Celery app (examples/shop_app.py), run by that app's own worker."""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebb import JobClient, JobStatus
from ebb.config import Settings
from tests.support import Management, publish_pickled_job, start_celery_worker, stop_worker, wait_until


@pytest.fixture
def shop_worker(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    queue = f"{settings.task_queue}.shop.{uuid.uuid4().hex[:6]}"
    log = tmp_path / "shop-worker.log"
    # The shop app accepts pickle for its own tasks, which Celery refuses to run as root (as CI
    # runs) unless told: C_FORCE_ROOT, for this test worker only.
    env = {"EBB_TASK_QUEUE": queue, "C_FORCE_ROOT": "1"}
    proc = start_celery_worker("examples.shop_app", log, env=env)
    try:
        yield dataclasses.replace(settings, task_queue=queue), log
    finally:
        stop_worker(proc)
        with JobClient(settings=settings) as cleanup:
            channel = cleanup._publish_channel
            for name in (queue, f"{queue}.audit", "shop"):
                cleanup._loop.call(functools.partial(channel.queue_delete, name))


def test_install_puts_ebb_on_the_app_next_to_its_own_settings() -> None:
    from examples.shop_app import app

    assert {"shop.add", "ebb.run_job", "ebb.audit_queues"} <= set(app.tasks)
    assert app.conf.accept_content == ["json", "pickle"]  # theirs, untouched
    assert set(app.conf.beat_schedule) == {"shop-nightly", "ebb-audit-queues"}
    ebb_queue = Settings.from_env().task_queue
    assert [q.name for q in app.conf.task_queues] == ["shop", ebb_queue, f"{ebb_queue}.audit"]
    assert app.conf.beat_schedule["ebb-audit-queues"]["options"]["queue"] == f"{ebb_queue}.audit"
    run_job = app.tasks["ebb.run_job"]
    assert run_job.acks_late and run_job.reject_on_worker_lost and run_job.serializer == "json"


def test_a_foreign_worker_runs_typed_ebb_jobs_and_its_own_tasks(
    shop_worker: tuple[Settings, Path], management: Management
) -> None:
    settings, log = shop_worker
    progress: list[float] = []
    with JobClient(settings=settings) as client:
        assert {"shop.invoice", "demo.sleep"} <= {w.name for w in client.list_workflows()}
        job = client.submit_job(
            "shop.invoice",
            {"customer": "ACME", "lines": 3},
            on_progress=lambda j, p: progress.append(p.progress),
        )
        result = client.wait(job, timeout=30)
        with pytest.raises(ValueError, match="'lines' = 0: expected a number >= 1"):
            client.submit_job("shop.invoice", {"customer": "ACME", "lines": 0})
    assert result.status is JobStatus.SUCCEEDED and result.output == {"customer": "ACME", "lines": 3}
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert not management.job_queues(job.id)

    from examples.shop_app import app

    app.send_task("shop.add", args=(2, 3), queue="shop")
    app.send_task("ebb.audit_queues", queue=settings.task_queue)
    assert wait_until(lambda: "Task shop.add[" in log.read_text() and "succeeded" in log.read_text(), 30)
    assert wait_until(lambda: "event=audit_summary" in log.read_text(), 30), log.read_text()[-2000:]


def test_a_pickled_job_is_refused_even_where_the_app_accepts_pickle(
    shop_worker: tuple[Settings, Path], tmp_path: Path
) -> None:
    settings, log = shop_worker
    marker = tmp_path / "pwned"
    job_id = uuid.uuid4()
    publish_pickled_job(settings, job_id, marker)
    assert wait_until(lambda: "event=task_refused" in log.read_text() and str(job_id) in log.read_text(), 15)
    assert not marker.exists(), "the worker unpickled a job message"


def test_a_worker_that_does_not_read_ebbs_queue_advertises_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    queue = f"{settings.task_queue}.shop.{uuid.uuid4().hex[:6]}"
    log = tmp_path / "shop-only.log"
    proc = start_celery_worker(
        "examples.shop_app", log, "-Q", "shop", env={"EBB_TASK_QUEUE": queue, "C_FORCE_ROOT": "1"}
    )
    try:
        assert "event=workflows_not_advertised" in log.read_text() or wait_until(
            lambda: "event=workflows_not_advertised" in log.read_text(), 10
        )
        with JobClient(settings=dataclasses.replace(settings, task_queue=queue)) as client:
            assert client.list_workflows() == []
    finally:
        stop_worker(proc)
        with JobClient(settings=settings) as cleanup:
            cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete("shop"))
