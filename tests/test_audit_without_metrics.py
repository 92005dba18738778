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
import re
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
from tests.support import ROOT, start_worker, stop_worker, wait_until

#: Database 4 of the suite's Redis (EBB_REDIS_URL): the 3.10 and 4.3 suites each have their own.
REDIS_URL = redis_url(4)


@pytest.fixture(scope="module")
def no_stats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("no-stats")
    broker = Cluster(
        base,
        size=1,
        extra_conf=Path(ROOT, "deploy", "rabbitmq.conf").read_text(),  # the documented deployment's
        advanced_config=Path(ROOT, "deploy", "rabbitmq-advanced.config").read_text(),
        plugins=("rabbitmq_prometheus",),
    )
    try:
        broker.start()
    except Exception as exc:  # a failure to start fails the suite, never skips
        broker.stop()
        pytest.fail(f"the statistics-free broker did not start: {exc}")
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def no_stats_broker(
    no_stats_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    node = no_stats_cluster.node(1)
    settings = dataclasses.replace(
        Settings.from_env(),
        broker_url=node.amqp_url,
        management_url=node.management_url,
        prometheus_url=node.prometheus_url,
        redis_url=REDIS_URL,
        task_queue=f"ebb.nostats.{uuid.uuid4().hex[:6]}",
    )
    log = tmp_path_factory.mktemp("no-stats-worker") / "worker.log"
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


def test_the_broker_really_has_no_consumer_statistics(no_stats_broker: Settings) -> None:
    answer = requests.get(
        f"{no_stats_broker.management_url}/api/consumers/%2F", auth=("guest", "guest"), timeout=10
    )
    assert answer.status_code == 400 and "disabled" in answer.text


def test_the_documented_broker_sweeps_its_metrics_every_ten_minutes(no_stats_cluster: Cluster) -> None:
    """deploy/rabbitmq-advanced.config took: each sweep copies every queue's metrics row."""
    answer = no_stats_cluster.ctl(1, "eval", "application:get_env(rabbit, core_metrics_gc_interval).")
    assert answer.stdout.strip() == "{ok,600000}"


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
    # RabbitMQ 4's Prometheus says which queues exist (3.10's does not): with the safety net, that
    # answer is all the audit reads; otherwise the management listing too.
    prometheus_alone = safety_net and rabbitmq_major(settings) >= 4
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


def rabbitmq_major(settings: Settings) -> int:
    return int(_version(settings).split(".")[0])


def _drop_metrics_rows(cluster: Cluster, queues: list[str]) -> bool:
    """What RabbitMQ's metrics housekeeping does to a queue declared while it runs: its row goes,
    and an idle queue does not report again on its own. True when, two statistics intervals
    later, none is back (a queue that was still reporting brings its row back: drop again)."""
    names = ", ".join(f'<<"{q}">>' for q in queues)
    rows = f'[rabbit_misc:r(<<"/">>, queue, N) || N <- [{names}]]'
    cluster.ctl(1, "eval", f"[ets:delete(queue_metrics, R) || R <- {rows}].")
    time.sleep(2.0)  # what is checked is that nothing happens
    back = cluster.ctl(1, "eval", f"lists:any(fun(R) -> ets:member(queue_metrics, R) end, {rows}).")
    return back.stdout.strip() == "false"


def test_a_waiting_job_whose_metrics_rows_rabbitmq_dropped_is_judged_in_use_again_and_an_orphan_still_expires(
    no_stats_cluster: Cluster, no_stats_broker: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A waiting job's queues stay idle: without their rows they would be ``new`` for as long as
    they wait, never judged and their record never renewed. The audit asks them to report again,
    which renews no lease: a dropped orphan still goes at its TTL."""
    held = f"ebb.nostats.held.{uuid.uuid4().hex[:6]}"  # a task queue no worker reads
    management = no_stats_broker.management_url
    requests.put(
        f"{management}/api/queues/%2F/{held}", json={"durable": True}, auth=("guest", "guest"), timeout=10
    ).raise_for_status()
    settings = dataclasses.replace(no_stats_broker, task_queue=held, check_workflows=False)
    orphan = uuid.uuid4()
    with Connection(settings.broker_url) as connection:
        job_queue(orphan, QueueKind.RESULT, timedelta(seconds=15)).queue_declare(channel=connection.channel())
    auditor = Auditor(settings)

    def states(job: str) -> dict[str, str]:
        return {f.queue: f.state for f in auditor.run().findings if f.job_id == job}

    try:
        with JobClient(settings=settings) as client, caplog.at_level(logging.INFO, "ebb.audit"):
            waiting = client.submit_job("demo.echo", {"x": 1}, updates=True, auto_cleanup_after_ttl=600)
            names = [queue_name(waiting.id, kind) for kind in QueueKind]
            assert wait_until(lambda: set(states(str(waiting.id)).values()) == {"in_use"}, 15)
            dropped_queues = [*names, queue_name(orphan, QueueKind.RESULT)]
            assert wait_until(lambda: _drop_metrics_rows(no_stats_cluster, dropped_queues), 30, interval=0)
            dropped = states(str(waiting.id))
            assert set(dropped) == set(names) and set(dropped.values()) == {"new"}, dropped
            missing = [line for line in caplog.text.splitlines() if "event=queue_counts_missing" in line]
            assert missing, "the queues without counts were not told"
            told = dict(re.findall(r"\b(queues|woken)=(\d+)", missing[-1]))
            assert int(told["queues"]) >= 3
            if rabbitmq_major(settings) >= 4:  # its queues can be asked to report again
                assert told["woken"] == told["queues"]
                assert wait_until(lambda: set(states(str(waiting.id)).values()) == {"in_use"}, 10), (
                    "the waiting job's queues were never judged again"
                )
            else:  # RabbitMQ 3 answers totals without asking the queue: unknown, said every run
                assert told["woken"] == "0"
                time.sleep(3)  # three statistics intervals: nothing brings the rows back
                assert set(states(str(waiting.id)).values()) == {"new"}
            orphan_url = f"{management}/api/queues/%2F/{queue_name(orphan, QueueKind.RESULT)}"
            assert wait_until(
                lambda: (
                    auditor.run() is not None
                    and requests.get(orphan_url, auth=("guest", "guest"), timeout=10).status_code == 404
                ),
                30,
            ), "waking the orphan's counts kept it alive past its TTL"
            client.disconnect_from_submitted_job(waiting, delete_queues=True)
    finally:
        requests.delete(f"{management}/api/queues/%2F/{held}", auth=("guest", "guest"), timeout=10)
    assert not [
        line for line in caplog.text.splitlines() if "orphan_found" in line and str(waiting.id) in line
    ]


def _detailed_scrapes(settings: Settings) -> int:
    """How many ``/metrics/detailed`` answers the node has rendered, this one included."""
    text = requests.get(
        f"{settings.prometheus_url}/metrics/detailed", params={"family": "identity_info"}, timeout=10
    ).text
    found = re.search(
        r'^telemetry_scrape_duration_seconds_count\{registry="detailed"[^}]*\} (\d+)', text, re.M
    )
    assert found is not None, text[:500]
    return int(found[1])


def test_rabbitmq_4_3_renders_the_audits_shares_at_once_and_every_job_queue_is_judged_once(
    no_stats_broker: Settings, safety_net: bool
) -> None:
    """One Erlang process renders an answer, so RabbitMQ 4.3+ is asked for EBB_AUDIT_STREAMS
    shares of the job queues at once (its ``queue`` filter); older nodes ignore that filter and
    are asked once. Whichever, a queue in no share would never be judged, one in two twice."""
    settings = dataclasses.replace(no_stats_broker, audit_streams=3)
    jobs = [uuid.UUID(first + uuid.uuid4().hex[1:]) for first in "0123456789abcdef"]
    names = sorted(queue_name(job, kind) for job in jobs for kind in QueueKind)
    with Connection(settings.broker_url) as connection:  # unused: their messages are asked for too
        channel = connection.channel()
        for job in jobs:
            for kind in QueueKind:
                job_queue(job, kind, timedelta(seconds=120)).queue_declare(channel=channel)

    def reported() -> bool:
        text = requests.get(
            f"{settings.prometheus_url}/metrics/detailed",
            params={"family": "queue_consumer_count", "vhost": "/"},
            timeout=10,
        ).text
        return all(f'queue="{name}"' in text for name in names)

    try:
        assert wait_until(reported, 30), "RabbitMQ never reported the new queues' counts"
        before = _detailed_scrapes(settings)
        report = Auditor(settings).run(delete_unexpiring=False)
        rendered = _detailed_scrapes(settings) - before - 1  # less the count's own answer
        judged = sorted(f.queue for f in report.findings if f.job_id in {str(j) for j in jobs})
        assert judged == names
        assert {f.state for f in report.findings if f.queue in names} == {"suspect"}
        # which nodes answer, then the consumer counts and the unused queues' message counts
        shares = 3 if tuple(map(int, _version(settings).split(".")[:2])) >= (4, 3) else 1
        assert rendered == 1 + 2 * shares
    finally:
        with Connection(settings.broker_url) as connection:
            channel = connection.channel()
            for name in names:
                channel.queue_delete(name)


def _version(settings: Settings) -> str:
    overview = requests.get(f"{settings.management_url}/api/overview", auth=("guest", "guest"), timeout=10)
    return str(overview.json()["rabbitmq_version"])
