"""Ebb on a real three-node RabbitMQ cluster (tests/cluster.py), through the loss of a node.

The caller is on node 2 (failover to node 1), the worker on node 3 (failover to node 1), as an
operator would spread them. A job's classic queues live on its caller's node; what happens when
that node is lost is the point: the queues are down, not expired, and the result is delivered
exactly once when the node is back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery

from ebb import JobClient, JobQueuesUnavailableError, JobResultLostError, JobStatus, WaitTimeoutError
from ebb.config import Settings
from ebb.contract import QueueKind, queue_name
from ebb.core import LOST_CHECK_EVERY
from tasks.audit import NODE_DOWN, Auditor
from tests.async_adapter import AsyncClientAsSync
from tests.cluster import Cluster, redis_url
from tests.conftest import AnyClient
from tests.support import start_worker, stop_worker, wait_until

#: The cluster's own database of the suite's Redis (EBB_REDIS_URL): its audit memory and registry
#: never mix with the suite's, and the 4.3 suite's stay on its own server.
REDIS_URL = redis_url(3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start()
    except Exception as exc:  # a failure to start is a failure of the suite, never a skip
        nodes.stop()
        pytest.fail(f"the test cluster did not start: {exc}")
    yield nodes
    nodes.stop()


@pytest.fixture
def all_nodes_up(cluster: Cluster) -> Iterator[Cluster]:
    """Every node runs before and after the test (a test that stops one starts it again)."""
    yield cluster
    for node in cluster.nodes:
        if node.pid() is None or not _running(node.pid()):
            cluster.start_node(node.index)


def _running(pid: int | None) -> bool:
    try:
        return pid is not None and Path(f"/proc/{pid}").exists()
    except OSError:
        return False


def cluster_settings(cluster: Cluster, *nodes: int, **changes: Any) -> Settings:
    queue = changes.pop("task_queue", None) or f"ebb.cluster.{uuid.uuid4().hex[:6]}"
    return dataclasses.replace(
        Settings.from_env(),
        broker_url=cluster.broker_url(*nodes),
        management_url=cluster.management_url(*nodes),
        redis_url=REDIS_URL,
        task_queue=queue,
        heartbeat=4,
        reconnect_timeout=60,
        **changes,
    )


@pytest.fixture
def cluster_worker(
    all_nodes_up: Cluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Settings, Path]]:
    """A worker on node 3 (failover node 1), of a task queue of its own; ``request.param``: env."""
    extra: dict[str, str] = getattr(request, "param", {})
    worker_side = cluster_settings(all_nodes_up, 3, 1)
    log = tmp_path / "worker.log"
    proc = start_worker(
        log,
        env={
            "EBB_BROKER_URL": worker_side.broker_url,
            "EBB_MANAGEMENT_URL": worker_side.management_url,
            "EBB_REDIS_URL": REDIS_URL,
            "EBB_TASK_QUEUE": worker_side.task_queue,
            "EBB_HEARTBEAT": "4",
            **extra,
        },
    )
    yield cluster_settings(all_nodes_up, 2, 1, task_queue=worker_side.task_queue), log
    stop_worker(proc)


def queue_node(cluster: Cluster, name: str, via: int = 1) -> str | None:
    answer = requests.get(
        f"{cluster.node(via).management_url}/api/queues/%2F/{name}", auth=("guest", "guest"), timeout=10
    )
    return str(answer.json().get("node")) if answer.ok else None


def all_gone(cluster: Cluster, names: list[str]) -> bool:
    return all(queue_node(cluster, name) is None for name in names)


def names_lost_nodes(cluster: Cluster) -> bool:
    """Whether the broker names a killed node to a caller: RabbitMQ 3 does in its 404 ("home
    node … is down"); RabbitMQ 4 names it in no AMQP answer (ebb.broker_replies), so a caller
    can only say "a RabbitMQ node" there (the worker asks the management API)."""
    overview = requests.get(
        f"{cluster.node(1).management_url}/api/overview", auth=("guest", "guest"), timeout=10
    ).json()
    return int(str(overview["rabbitmq_version"]).split(".")[0]) < 4


def test_a_job_on_the_cluster_keeps_its_queues_on_the_callers_node(
    all_nodes_up: Cluster, cluster_worker: tuple[Settings, Path]
) -> None:
    settings, _ = cluster_worker
    with JobClient(settings=settings) as client:
        job = client.submit_job("demo.sleep", {"seconds": 1, "steps": 2}, on_progress=lambda j, p: None)
        assert {queue_node(all_nodes_up, job.queue_name(k)) for k in job.queues} == {"ebb-n2@localhost"}
        assert queue_node(all_nodes_up, settings.task_queue) == "ebb-n3@localhost"  # the worker's
        assert client.wait(job, timeout=30).status is JobStatus.SUCCEEDED
    assert all(queue_node(all_nodes_up, job.queue_name(k)) is None for k in job.queues)


@pytest.mark.parametrize(("kind", "loss"), [("sync", "kill"), ("async", "kill"), ("sync", "stop")])
def test_queues_on_a_lost_node_are_down_not_expired_and_the_result_comes_back_once(
    kind: str, loss: str, all_nodes_up: Cluster, cluster_worker: tuple[Settings, Path]
) -> None:
    """``kill``: SIGKILL, a crash; ``stop``: a clean ``rabbitmqctl stop``, whose broker nacks
    what is published to the stopping node's queues."""
    settings, log = cluster_worker
    finished: list[object] = []
    make = JobClient if kind == "sync" else AsyncClientAsSync
    with make(settings=settings) as client:
        job = client.submit_job("demo.sleep", {"seconds": 4, "steps": 2}, auto_cleanup_after_ttl=300)
        assert queue_node(all_nodes_up, job.queue_name(QueueKind.RESULT)) == "ebb-n2@localhost"
        time.sleep(1)
        # the caller's node, and so its job's queues' home
        (all_nodes_up.kill_node if loss == "kill" else all_nodes_up.stop_node)(2)
        started = time.monotonic()
        with pytest.raises(JobQueuesUnavailableError, match="down or unreachable") as lost:
            client.wait(job, timeout=60)  # the client fails over to node 1, then finds them down
        if loss == "kill" and names_lost_nodes(all_nodes_up):  # one caught stopping is not named
            assert "ebb-n2@localhost" in str(lost.value)
        assert time.monotonic() - started < 30, "a waiting client must not hang on a lost node"
        with pytest.raises(JobQueuesUnavailableError):
            client.connect_to_submitted_job(job)
    # The worker finished meanwhile: its result comes back unroutable, and it keeps trying.
    assert wait_until(lambda: "event=publish_retrying" in log.read_text(), 30), log.read_text()[-3000:]
    all_nodes_up.start_node(2)
    assert wait_until(lambda: "event=job_result_published" in log.read_text(), 60), log.read_text()[-3000:]
    with make(settings=dataclasses.replace(settings, broker_url=all_nodes_up.broker_url(1))) as again:
        again.connect_to_submitted_job(job, on_finished=lambda j, r: finished.append(r))
        result = again.wait(job, timeout=30)
        assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 4}
        record = again.job_status(job)
        assert record.result_delivered and record.lost is None
    assert len(finished) == 1
    assert all(queue_node(all_nodes_up, queue_name(job.id, k)) is None for k in QueueKind)


@pytest.mark.parametrize("cluster_worker", [{"EBB_RESULT_RETRY": "4"}], indirect=True)
def test_a_result_kept_past_ebb_result_retry_is_recorded_undelivered_never_silently_lost(
    all_nodes_up: Cluster, cluster_worker: tuple[Settings, Path]
) -> None:
    """The node stays down longer than the worker's bound: the registry says what became of it,
    and a caller waiting on the job once its node is back hears it from wait() (both clients)."""
    settings, log = cluster_worker
    with JobClient(settings=settings) as client:
        jobs = [
            client.submit_job("demo.sleep", {"seconds": 1, "steps": 1}, auto_cleanup_after_ttl=300)
            for _ in range(2)
        ]
        for job in jobs:
            client.disconnect_from_submitted_job(job)  # the caller goes away; its queues stay
    all_nodes_up.kill_node(2)
    assert wait_until(lambda: log.read_text().count("event=result_undeliverable") == 2, 40), log.read_text()[
        -3000:
    ]
    with JobClient(settings=dataclasses.replace(settings, broker_url=all_nodes_up.broker_url(1))) as client:
        record = client.job_status(jobs[0])
        assert record.lost is not None and "result not delivered" in record.lost
        assert "ebb-n2@localhost" in record.lost and "EBB_RESULT_RETRY" in record.lost
        assert not record.result_delivered
        assert "result not delivered" in record.story()
    all_nodes_up.start_node(2)
    makers: tuple[Callable[..., AnyClient], ...] = (JobClient, AsyncClientAsSync)
    for make, job in zip(makers, jobs, strict=True):
        names = [job.queue_name(k) for k in job.queues]
        with make(settings=settings) as client:
            client.connect_to_submitted_job(job)  # its queues are back, the result queue empty
            started = time.monotonic()
            with pytest.raises(JobResultLostError, match="result not delivered") as lost:
                client.wait(job, timeout=60)
            assert time.monotonic() - started < LOST_CHECK_EVERY + 10, "the wait outlived the check"
            assert lost.value.status == "SUCCEEDED"
        assert wait_until(functools.partial(all_gone, all_nodes_up, names), 15)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_quorum_job_queues_survive_the_loss_of_the_callers_node_with_nothing_lost(
    kind: str, all_nodes_up: Cluster, cluster_worker: tuple[Settings, Path]
) -> None:
    settings = dataclasses.replace(cluster_worker[0], queue_type="quorum")
    finished: list[object] = []
    progress: list[float] = []
    make = JobClient if kind == "sync" else AsyncClientAsSync
    with make(settings=settings) as client:
        job = client.submit_job(
            "demo.sleep",
            {"seconds": 4, "steps": 4},
            on_finished=lambda j, r: finished.append(r),
            on_progress=lambda j, p: progress.append(p.progress),
            auto_cleanup_after_ttl=300,
        )
        queue = requests.get(
            f"{all_nodes_up.node(1).management_url}/api/queues/%2F/{job.queue_name(QueueKind.RESULT)}",
            auth=("guest", "guest"),
            timeout=10,
        ).json()
        assert queue["type"] == "quorum"
        time.sleep(1)
        all_nodes_up.kill_node(2)  # the caller's node: the client fails over, the queues stay up
        result = client.wait(job, timeout=60)
    assert result.status is JobStatus.SUCCEEDED and len(finished) == 1
    assert progress and progress[-1] == 1.0
    assert all(queue_node(all_nodes_up, queue_name(job.id, k)) is None for k in QueueKind)


@pytest.mark.parametrize("cluster_worker", [{"EBB_TASK_QUEUE_TYPE": "quorum"}], indirect=True)
def test_a_worker_survives_the_loss_of_the_node_holding_its_quorum_task_queue(
    all_nodes_up: Cluster, cluster_worker: tuple[Settings, Path]
) -> None:
    settings, log = cluster_worker
    task_queue = requests.get(
        f"{all_nodes_up.node(1).management_url}/api/queues/%2F/{settings.task_queue}",
        auth=("guest", "guest"),
        timeout=10,
    ).json()
    assert task_queue["type"] == "quorum"
    all_nodes_up.kill_node(3)  # the worker's node: it fails over to node 1
    with JobClient(settings=settings) as client:
        node_1 = f"Connected to amqp://guest:**@127.0.0.1:{all_nodes_up.node(1).amqp_port}"
        assert wait_until(lambda: node_1 in log.read_text(), 60), log.read_text()[-3000:]
        # Logged before the worker consumes again: the job waits in the quorum queue till then.
        job = client.submit_job("demo.sleep", {"seconds": 0.5, "steps": 1})
        try:
            result = client.wait(job, timeout=60)
        except WaitTimeoutError:
            pytest.fail(f"no result in 60 s; the worker's log ends:\n{log.read_text()[-3000:]}")
        assert result.status is JobStatus.SUCCEEDED
    # Remote control (Flower's enable_events) reaches it on node 1 too: its control queue was
    # declared there anew, not refused as locked by the lost node (tasks/pidbox.py).
    worker = re.search(r"\] (\S+@\S+) ready\.", log.read_text())
    assert worker, log.read_text()[-3000:]
    with Celery("probe", broker=all_nodes_up.node(1).amqp_url, set_as_current=False) as probe:
        assert probe.control.ping(destination=[worker[1]], timeout=10) == [{worker[1]: {"ok": "pong"}}]


def test_the_audit_reports_a_down_node_once_per_run_and_never_its_queues_as_orphans(
    all_nodes_up: Cluster, cluster_worker: tuple[Settings, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings, _ = cluster_worker
    with JobClient(settings=settings) as client:
        job = client.submit_job("demo.sleep", {"seconds": 30, "steps": 1}, auto_cleanup_after_ttl=8)
        client.disconnect_from_submitted_job(job)  # unused from now on: an orphan in 8 s, if it stayed up
    all_nodes_up.kill_node(2)
    # The management list starts with the down node: the audit fails over to node 1.
    auditor = Auditor(dataclasses.replace(settings, management_url=all_nodes_up.management_url(2, 1, 3)))
    auditor.confirm_after = 3.0
    with caplog.at_level(logging.INFO, "ebb.audit"):
        deadline = time.monotonic() + 15  # past the TTL and the confirmation
        runs = 0
        while time.monotonic() < deadline:
            report = auditor.run()
            runs += 1
            time.sleep(1.5)
    ours = [f for f in report.findings if f.job_id == str(job.id)]
    assert {f.state for f in ours} == {NODE_DOWN} and len(ours) == 1
    assert report.nodes_down == ["ebb-n2@localhost"]
    down_lines = [line for line in caplog.text.splitlines() if "event=broker_node_down" in line]
    assert len(down_lines) == runs and all("node=ebb-n2@localhost" in line for line in down_lines)
    assert str(job.id) not in "".join(
        line for line in caplog.text.splitlines() if "orphan_found" in line or "orphan_removed" in line
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_caller_hears_when_its_jobs_node_goes_down_under_its_consumers_and_gets_the_result_once(
    kind: str, all_nodes_up: Cluster, cluster_worker: tuple[Settings, Path]
) -> None:
    """The caller on node 2 watches a job whose queues live on node 1; node 1 stops and starts
    again, the caller's own node stays up. RabbitMQ cancels the caller's consumers: before, the
    client ignored that and neither received the result nor raised (70 s and more)."""
    settings, _ = cluster_worker
    with JobClient(
        settings=dataclasses.replace(settings, broker_url=all_nodes_up.broker_url(1))
    ) as submitter:
        job = submitter.submit_job("demo.sleep", {"seconds": 6, "steps": 2}, auto_cleanup_after_ttl=300)
        submitter.disconnect_from_submitted_job(job, delete_queues=False)
    assert queue_node(all_nodes_up, job.queue_name(QueueKind.RESULT), via=2) == "ebb-n1@localhost"
    finished: list[object] = []
    make = JobClient if kind == "sync" else AsyncClientAsSync
    with make(settings=dataclasses.replace(settings, broker_url=all_nodes_up.broker_url(2))) as client:
        client.connect_to_submitted_job(job, on_finished=lambda j, r: finished.append(r))
        all_nodes_up.stop_node(1)
        started = time.monotonic()
        with pytest.raises(JobQueuesUnavailableError):
            client.wait(job, timeout=60)
        assert time.monotonic() - started < 20, "the broker's cancel went unheard"
        all_nodes_up.start_node(1)

        def connected() -> bool:
            try:
                client.connect_to_submitted_job(job, on_finished=lambda j, r: finished.append(r))
                return True
            except JobQueuesUnavailableError:
                return False

        assert wait_until(connected, 60), "the job's queues never came back with their node"
        result = client.wait(job, timeout=150)  # the worker retries its result for EBB_RESULT_RETRY
    assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 6}
    assert len(finished) == 1
