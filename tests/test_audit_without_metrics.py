"""The audit on a broker whose management statistics are off (deprecated in RabbitMQ 4).

There ``/api/consumers`` answers 400 ("Stats in management UI are disabled"), so consumer
counts come from rabbitmq_prometheus' per-queue metrics. A broker of its own (one node of
tests/cluster.py, ``management_agent.disable_metrics_collector = true``, the prometheus plugin
on), so the machine's broker keeps its statistics; the other audit tests are the other mode.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from kombu.connection import Connection

from ebb import JobClient
from ebb.config import Settings
from ebb.contract import QueueKind, job_queue, queue_name
from tasks.audit import Auditor
from tests.cluster import Cluster, redis_url
from tests.support import ROOT, start_worker, stop_worker

#: Database 4 of the suite's Redis (EBB_REDIS_URL): the 3.10 and 4.3 suites each have their own.
REDIS_URL = redis_url(4)


@pytest.fixture(scope="module")
def no_stats_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    base = tmp_path_factory.mktemp("no-stats")
    broker = Cluster(
        base,
        size=1,
        extra_conf=Path(ROOT, "deploy", "rabbitmq.conf").read_text(),  # the documented deployment's
        plugins=("rabbitmq_prometheus",),
    )
    try:
        broker.start()
    except Exception as exc:  # a failure to start fails the suite, never skips
        broker.stop()
        pytest.fail(f"the statistics-free broker did not start: {exc}")
    node = broker.node(1)
    settings = dataclasses.replace(
        Settings.from_env(),
        broker_url=node.amqp_url,
        management_url=node.management_url,
        prometheus_url=node.prometheus_url,
        redis_url=REDIS_URL,
        task_queue=f"ebb.nostats.{uuid.uuid4().hex[:6]}",
    )
    log = base / "worker.log"
    worker = start_worker(
        log,
        env={
            "EBB_BROKER_URL": settings.broker_url,
            "EBB_REDIS_URL": REDIS_URL,
            "EBB_TASK_QUEUE": settings.task_queue,
        },
    )
    yield settings
    stop_worker(worker)
    broker.stop()


def test_the_broker_really_has_no_consumer_statistics(no_stats_broker: Settings) -> None:
    answer = requests.get(
        f"{no_stats_broker.management_url}/api/consumers/%2F", auth=("guest", "guest"), timeout=10
    )
    assert answer.status_code == 400 and "disabled" in answer.text


@pytest.fixture(params=["safety net", "no policy"])
def safety_net(request: pytest.FixtureRequest, no_stats_broker: Settings) -> Iterator[bool]:
    """With deploy/rabbitmq-policy.sh's operator policy the audit reads Prometheus alone (no
    queue's arguments needed); without it, the management listing as well."""
    url = no_stats_broker.management_url
    if request.param == "safety net":
        env = {"RABBITMQ_URL": url, "RABBITMQ_ADMIN_USER": "guest", "RABBITMQ_ADMIN_PASSWORD": "guest"}
        subprocess.run(
            ["sh", str(Path(ROOT, "deploy", "rabbitmq-policy.sh"))],
            env={**os.environ, **env, "EBB_MAX_TTL": "604800"},
            check=True,
            capture_output=True,
            timeout=60,
        )
    yield request.param == "safety net"
    requests.delete(f"{url}/api/operator-policies/%2F/ebb-job-queues", auth=("guest", "guest"), timeout=10)


def test_without_statistics_an_orphan_is_found_and_removed_and_a_connected_caller_never_accused(
    no_stats_broker: Settings, safety_net: bool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = no_stats_broker
    version = requests.get(
        f"{settings.management_url}/api/overview", auth=("guest", "guest"), timeout=10
    ).json()
    # RabbitMQ 4's Prometheus says which queues exist (3.10's does not): with the safety net, that
    # answer is all the audit reads; otherwise the management listing too.
    prometheus_alone = safety_net and int(str(version["rabbitmq_version"]).split(".")[0]) >= 4
    orphan = uuid.uuid4()
    with Connection(settings.broker_url) as connection:  # as a vanished caller leaves it
        job_queue(orphan, QueueKind.RESULT, timedelta(seconds=10)).queue_declare(channel=connection.channel())
    auditor = Auditor(settings)
    with JobClient(settings=settings) as client, caplog.at_level(logging.INFO, "ebb.audit"):
        running = client.submit_job(
            "demo.sleep",
            {"seconds": 14, "steps": 2},
            on_progress=lambda j, p: None,
            auto_cleanup_after_ttl=60,
        )
        states: set[str] = set()
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            report = auditor.run()
            assert report.consumers_from == "prometheus"
            assert auditor.api.arguments_listed is not prometheus_alone
            states |= {f.state for f in report.findings if f.job_id == str(running.id)}
            if "event=orphan_removed" in caplog.text and str(orphan) in caplog.text:
                break
            time.sleep(2)
        assert client.wait(running, timeout=30).succeeded
    assert "in_use" in states and "orphaned" not in states
    lines = caplog.text.splitlines()
    found = [line for line in lines if "event=orphan_found" in line and str(orphan) in line]
    removed = [line for line in lines if "event=orphan_removed" in line and str(orphan) in line]
    assert len(found) == 1 and queue_name(orphan, QueueKind.RESULT) in found[0]
    assert len(removed) == 1
    assert not [line for line in lines if "orphan_" in line and str(running.id) in line]
