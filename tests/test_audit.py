"""The orphaned-queue audit against real RabbitMQ, Redis, workers and beat."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from kombu.connection import Connection

from ebb import Job, JobClient, JobQueuesExpiredError
from ebb.config import Settings
from ebb.contract import QueueKind, job_queue, queue_name
from tasks.audit import Auditor
from tests.support import (
    ROOT,
    ClientProcess,
    Management,
    broker_url_as,
    start_worker,
    stop_worker,
    wait_until,
)


def audit_lines(text: str, event: str, job_id: uuid.UUID) -> list[str]:
    return [line for line in text.splitlines() if f"event={event}" in line and str(job_id) in line]


def test_killed_client_orphans_are_logged_then_removed_with_what_was_lost(
    settings: Settings, worker: Path, management: Management, caplog: pytest.LogCaptureFixture
) -> None:
    auditor = Auditor(settings)
    auditor.confirm_after = 6.0  # > the 5 s management stats interval: counts are fresh
    caller = ClientProcess("demo.sleep", {"seconds": 0.3, "steps": 1}, ttl=25)
    job = Job.from_json(caller.job_json)
    assert caller.read_event() == "status RUNNING"
    caller.kill()
    killed = time.monotonic()
    gone_at = None
    with caplog.at_level(logging.INFO, "ebb.audit"):
        while time.monotonic() - killed < 45:
            auditor.run()  # about once a second: it must never keep the queues alive
            if gone_at is None and not management.job_queues(job.id):
                gone_at = time.monotonic() - killed
            if gone_at is not None and audit_lines(caplog.text, "orphan_removed", job.id):
                break
            time.sleep(1)
    assert gone_at is not None, "the audited queues never expired"
    assert 24 <= gone_at <= 32, f"queues went {gone_at:.1f}s after the kill, TTL is 25s"
    found = audit_lines(caplog.text, "orphan_found", job.id)
    assert len(found) == 3, found  # result, progress and status, each reported once
    result_found = next(line for line in found if ".result" in line)
    assert "messages=1" in result_found and "registry_status=SUCCEEDED" in result_found
    removed = audit_lines(caplog.text, "orphan_removed", job.id)
    assert len(removed) == 3, removed
    assert any(".result" in line and 'lost="result never delivered"' in line for line in removed)
    with JobClient(settings=settings) as client:
        status = client.job_status(job)
        assert status.queues_removed_at is not None
        assert status.lost == "result never delivered"
        with pytest.raises(JobQueuesExpiredError, match="result never delivered"):
            client.connect_to_submitted_job(job)


def test_orphan_with_a_ttl_shorter_than_confirmation_is_still_found_and_removed(
    client: JobClient, settings: Settings, worker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 10 s TTL, audits 2 s apart: the broker removes the queues before the 12 s confirmation.

    They are logged found and removed all the same, each once, with what was lost; the queues of
    a job whose caller took its result (and deleted them) in the meantime are never reported.
    """
    auditor = Auditor(settings)
    assert auditor.confirm_after > 10
    caller = ClientProcess("demo.sleep", {"seconds": 0.3, "steps": 1}, ttl=10)
    orphan = Job.from_json(caller.job_json)
    assert caller.read_event() == "status RUNNING"
    caller.kill()
    finished = client.submit_job(
        "demo.sleep",
        {"seconds": 3, "steps": 3},
        on_progress=lambda j, p: None,
        on_status=lambda j, s: None,
        auto_cleanup_after_ttl=10,
    )
    killed = time.monotonic()
    with caplog.at_level(logging.INFO, "ebb.audit"):
        while time.monotonic() - killed < 30:
            auditor.run()
            if len(audit_lines(caplog.text, "orphan_removed", orphan.id)) == 3:
                break
            time.sleep(2)
        client.wait(finished, timeout=30)
        for _ in range(3):  # the finished job's queues are gone by now: still nothing about them
            auditor.run()
            time.sleep(2)
    found = audit_lines(caplog.text, "orphan_found", orphan.id)
    assert sorted(line.split("queue=")[1].split()[0] for line in found) == sorted(
        queue_name(orphan.id, kind) for kind in QueueKind
    ), found
    removed = audit_lines(caplog.text, "orphan_removed", orphan.id)
    assert len(removed) == 3, removed
    assert any(".result" in line and 'lost="result never delivered"' in line for line in removed)
    assert not audit_lines(caplog.text, "orphan_found", finished.id)
    assert not audit_lines(caplog.text, "orphan_removed", finished.id)
    assert client.job_status(orphan).lost == "result never delivered"


def test_connected_client_is_never_reported(
    client: JobClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    auditor = Auditor(settings)
    job = client.submit_job(
        "demo.sleep", {"seconds": 16, "steps": 2}, on_progress=lambda j, p: None, on_status=lambda j, s: None
    )
    states: set[str] = set()
    with caplog.at_level(logging.INFO, "ebb.audit"):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            report = auditor.run()
            states |= {f.state for f in report.findings if f.job_id == str(job.id)}
            time.sleep(1)
    assert "in_use" in states
    assert "orphaned" not in states  # at most "suspect" for a moment: never confirmed, never logged
    assert not audit_lines(caplog.text, "orphan_found", job.id)
    client.wait(job, timeout=30)


@pytest.fixture
def policy_free(settings: Settings, private_vhost: str) -> Settings:
    """A vhost without the expiry safety net (deploy/rabbitmq-policy.sh): there, a queue
    declared without x-expires really never expires."""
    return dataclasses.replace(settings, broker_url=broker_url_as(settings, vhost=private_vhost))


@pytest.fixture
def unexpiring_queue(policy_free: Settings) -> Iterator[str]:
    """A hand-made job queue without x-expires, as an old client or a person might leave."""
    settings = policy_free
    name = queue_name(uuid.uuid4(), QueueKind.RESULT)
    with Connection(settings.broker_url) as connection:
        channel = connection.channel()
        channel.queue_declare(name, durable=True, auto_delete=False)
        channel.close()
    yield name
    with Connection(settings.broker_url) as connection:
        channel = connection.channel()
        channel.queue_delete(name)
        channel.close()


def test_queue_without_expiry_is_reported_once_and_deleted_only_when_enabled(
    policy_free: Settings, unexpiring_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings, management = policy_free, Management(policy_free)
    auditor = Auditor(settings)
    job_id = uuid.UUID(unexpiring_queue.split(".")[1])
    assert wait_until(lambda: (management.queue(unexpiring_queue) or {}).get("consumers") == 0, 15)
    with caplog.at_level(logging.INFO, "ebb.audit"):
        first = auditor.run(delete_unexpiring=False)
        auditor.run(delete_unexpiring=False)
    mine = [f for f in first.findings if f.queue == unexpiring_queue]
    assert [f.state for f in mine] == ["no_expiry"]
    assert not mine[0].registered
    assert len(audit_lines(caplog.text, "queue_without_expiry", job_id)) == 1
    assert management.queue(unexpiring_queue) is not None, "deleted although the option was off"

    # With a consumer it survives even with the option on...
    with Connection(settings.broker_url) as connection:
        channel = connection.channel()
        channel.basic_consume(unexpiring_queue, callback=lambda m: None)
        assert wait_until(lambda: (management.queue(unexpiring_queue) or {}).get("consumers") == 1, 15)
        report = auditor.run(delete_unexpiring=True)
        assert unexpiring_queue not in report.deleted
        assert management.queue(unexpiring_queue) is not None
    # ...and without one it goes, with a log line.
    assert wait_until(lambda: (management.queue(unexpiring_queue) or {}).get("consumers") == 0, 15)
    with caplog.at_level(logging.INFO, "ebb.audit"):
        report = auditor.run(delete_unexpiring=True)
    assert report.deleted == [unexpiring_queue]
    assert management.queue(unexpiring_queue) is None
    assert len(audit_lines(caplog.text, "queue_deleted", job_id)) == 1


@pytest.fixture
def idle_job_queue(settings: Settings) -> Iterator[str]:
    """A job queue as a vanished caller leaves it: declared like the SDK does, never consumed."""
    name = queue_name(uuid.uuid4(), QueueKind.RESULT)
    with Connection(settings.broker_url) as connection:
        channel = connection.channel()
        queue = job_queue(uuid.UUID(name.split(".")[1]), QueueKind.RESULT, timedelta(minutes=5))
        queue.queue_declare(channel=channel)
        yield name
        channel.queue_delete(name)
        channel.close()


def test_audit_without_redis_still_reports_unused_queues_and_says_it_is_degraded(
    settings: Settings, idle_job_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    no_redis = Settings(**{**settings.__dict__, "redis_url": "redis://127.0.0.1:1/0"})
    with caplog.at_level(logging.INFO, "ebb.audit"):
        report = Auditor(no_redis).run()
    assert not report.registry_available
    mine = [f for f in report.findings if f.queue == idle_job_queue]
    assert [(f.state, f.registered) for f in mine] == [("suspect", False)]
    job_id = uuid.UUID(idle_job_queue.split(".")[1])
    assert len(audit_lines(caplog.text, "orphan_found", job_id)) == 1
    assert "event=audit_degraded" in caplog.text
    assert "registry=unavailable" in caplog.text


def test_beat_restart_reports_nothing_twice(
    settings: Settings, worker: Path, management: Management, tmp_path: Path
) -> None:
    env = {"EBB_AUDIT_INTERVAL": "1", "EBB_TASK_QUEUE": f"{settings.task_queue}.beat"}
    beat_args = ("-B", "-s", str(tmp_path / "beat-schedule"))
    caller = ClientProcess("demo.sleep", {"seconds": 0.2, "steps": 1}, ttl=30)
    job = Job.from_json(caller.job_json)
    assert caller.read_event() == "status RUNNING"
    caller.kill()
    first_log, second_log = tmp_path / "beat1.log", tmp_path / "beat2.log"
    first = start_worker(first_log, *beat_args, env=env)
    try:
        assert wait_until(lambda: len(audit_lines(first_log.read_text(), "orphan_found", job.id)) == 3, 40), (
            "the beat audit never reported the killed client's queues"
        )
    finally:
        stop_worker(first)
    second = start_worker(second_log, *beat_args, env=env)
    try:
        assert wait_until(lambda: second_log.read_text().count("event=audit_summary") >= 3, 30)
        assert audit_lines(second_log.read_text(), "orphan_found", job.id) == []
        assert wait_until(lambda: len(audit_lines(second_log.read_text(), "orphan_removed", job.id)) == 3, 40)
    finally:
        stop_worker(second)
    both = first_log.read_text() + second_log.read_text()
    assert len(audit_lines(both, "orphan_found", job.id)) == 3
    assert len(audit_lines(both, "orphan_removed", job.id)) == 3
    assert "ebb.audit_queues" in both  # the audit runs as a Celery task: Flower sees it
    with JobClient(settings=settings) as cleanup:
        cleanup._loop.call(lambda: cleanup._publish_channel.queue_delete(env["EBB_TASK_QUEUE"]))


def test_ebb_audit_command_prints_json(settings: Settings, worker: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ebb.cli", "audit", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["counts"]) >= {"in_use", "orphaned", "no_expiry", "unknown_to_registry"}
    assert isinstance(report["queues"], list)
