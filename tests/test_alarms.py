"""A RabbitMQ memory alarm (issue 21): nothing is lost, and no submit waits past its bound.

What RabbitMQ does (3.10.8 and 4.3.6 alike, seen on a node of this module's): once the alarm is
raised every connection is "blocking"; the first message a connection publishes is neither
routed nor confirmed, and it is answered at once with ``connection.blocked`` ("low on memory").
From then on the broker reads nothing from that connection (a queue.declare goes unanswered too)
but still writes to it: deliveries and heartbeats go on, and so do the acks of a connection
that never published. When the alarm clears, ``connection.unblocked`` comes and the held message
is routed and confirmed. A worker's result publish therefore waits for the alarm to clear
(tasks/publisher.py logs the block and the unblock), and is delivered then.

The alarm would block every publisher of the suite's broker, so it is raised on a node of this
module's own (tests/cluster.py: the suite's cluster ports plus ``PORT_SHIFT``, so 5731 on 3.10
and 5751 on 4.3), with a worker of its own, as the chaos harness's ``memory_alarm`` fault does
(``rabbitmqctl set_vm_memory_high_watermark``). The alarm is cleared after every test, whatever
its outcome.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ebb import BrokerBlockedError, BrokerUnavailableError, Job, JobResult, JobStatus
from ebb.config import Settings
from ebb.contract import parse_queue_name
from tests.chaos.faults import ALARM_WATERMARK, NORMAL_WATERMARK
from tests.cluster import BASE_PORT, BASE_PORT_ENV, Cluster, env_port, redis_url
from tests.conftest import AnyClient
from tests.support import Management, private_worker, wait_until

#: The node's ports: the suite's cluster ports plus this (3.10: 5731, 4.3: 5751; management
#: 15731/15751), clear of the cluster's, the TLS node's and the chaos runs'.
PORT_SHIFT = 50
#: Database 5 of the suite's Redis: this node's registry and adverts stay apart from the suite's.
REDIS_URL = redis_url(5)
#: EBB_BROKER_TIMEOUT of the callers here: how long a submit may wait for an alarm to clear.
BROKER_TIMEOUT = 5.0
#: What a submit may take beyond its bound (a registry write, a loaded machine).
MARGIN = 3.0
#: How long the job running into the alarm sleeps: it ends (and publishes its result) once the
#: alarm is raised, however slow rabbitmqctl is on a loaded machine, and before the alarm's three
#: submits (three bounds) are over.
SLEEP = 8
#: Long enough that the queues' expiry can explain nothing a test sees.
TTL = 600


@pytest.fixture(scope="module")
def alarm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    node = Cluster(
        tmp_path_factory.mktemp("alarm-node"),
        size=1,
        prefix="ebb-alarm",
        base_port=env_port(BASE_PORT_ENV, BASE_PORT) + PORT_SHIFT,
    )
    try:
        node.start()
    except Exception as exc:  # a failure to start fails the suite, never skips
        node.stop()
        pytest.fail(f"the alarm test's RabbitMQ node did not start: {exc}")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def alarm_worker(
    alarm_node: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, Path]]:
    """A worker on the node, of a task queue of its own; yields the callers' settings and its log."""
    node = alarm_node.node(1)
    settings = dataclasses.replace(
        Settings.from_env(),
        broker_url=node.amqp_url,
        management_url=node.management_url,
        prometheus_url=node.prometheus_url,
        redis_url=REDIS_URL,
        broker_timeout=BROKER_TIMEOUT,
        heartbeat=4,  # a blocked connection is not a dead one: both sides keep hearing heartbeats
    )
    log = tmp_path_factory.mktemp("alarm-worker") / "worker.log"
    env = {
        "EBB_BROKER_URL": settings.broker_url,
        "EBB_MANAGEMENT_URL": settings.management_url,
        "EBB_REDIS_URL": REDIS_URL,
        "EBB_HEARTBEAT": "4",
    }
    with private_worker(settings, log, name="alarm", env=env) as callers:
        yield callers, log


class MemoryAlarm:
    """The node's memory alarm, raised and cleared as an operator (or the chaos harness) does."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.url = f"{cluster.node(1).management_url}/api/health/checks/alarms"

    def in_effect(self) -> bool:
        """The broker's own answer (not its statistics, which lag by seconds)."""
        answer = requests.get(self.url, auth=("guest", "guest"), timeout=10)
        if answer.status_code not in (200, 503):
            answer.raise_for_status()
        return answer.status_code == 503 and "memory" in answer.text

    def raise_(self) -> None:
        self.cluster.ctl(1, "set_vm_memory_high_watermark", ALARM_WATERMARK)
        assert wait_until(self.in_effect, 30), "the memory alarm was not raised"

    def clear(self) -> None:
        self.cluster.ctl(1, "set_vm_memory_high_watermark", NORMAL_WATERMARK)
        assert wait_until(lambda: not self.in_effect(), 30), "the memory alarm did not clear"


@pytest.fixture
def alarm(alarm_node: Cluster) -> Iterator[MemoryAlarm]:
    memory = MemoryAlarm(alarm_node)
    try:
        yield memory
    finally:
        memory.clear()  # whatever the test did: the next one, and the node's stop, find none


def logged(log: Path, event: str, job_id: uuid.UUID) -> int:
    """How many of the worker's log lines say ``event`` of this job."""
    text = log.read_text() if log.exists() else ""
    return sum(1 for line in text.splitlines() if f"event={event} " in line and f"job_id={job_id}" in line)


def job_queue_ids(management: Management) -> set[uuid.UUID]:
    """The jobs that have queues on the node (its management API: never touches a queue)."""
    return {parsed[0] for name in management.all_job_queue_names() if (parsed := parse_queue_name(name))}


@dataclasses.dataclass
class Attempt:
    """One submit made during the alarm: the job it returned, or the error it raised, and when."""

    took: float
    job: Job | None = None
    error: BrokerUnavailableError | None = None

    @property
    def job_id(self) -> uuid.UUID | None:
        if self.job is not None:
            return self.job.id
        return self.error.job_id if self.error is not None else None


def submit(client: AnyClient, n: int, results: dict[uuid.UUID, list[JobResult]]) -> Attempt:
    """``demo.echo`` with a result callback; ``BrokerUnavailableError`` kept, anything else raised."""

    def on_finished(job: Job, result: JobResult) -> None:
        results.setdefault(job.id, []).append(result)

    started = time.monotonic()
    try:
        job = client.submit_job("demo.echo", {"n": n}, on_finished=on_finished, auto_cleanup_after_ttl=TTL)
    except BrokerUnavailableError as exc:
        return Attempt(time.monotonic() - started, error=exc)
    return Attempt(time.monotonic() - started, job=job)


def test_a_memory_alarm_bounds_every_submit_and_loses_no_result(
    make_client: Callable[..., AnyClient], alarm_worker: tuple[Settings, Path], alarm: MemoryAlarm
) -> None:
    settings, log = alarm_worker
    management = Management(settings)
    results: dict[uuid.UUID, list[JobResult]] = {}
    client = make_client(settings=settings)
    try:
        # A job running when the alarm is raised: its result is published into the alarm.
        running = client.submit_job(
            "demo.sleep",
            {"seconds": SLEEP},
            on_finished=lambda job, result: results.setdefault(job.id, []).append(result),
            auto_cleanup_after_ttl=TTL,
        )
        assert wait_until(lambda: logged(log, "job_started", running.id) == 1, 30), "the job never started"
        alarm.raise_()

        attempts = [submit(client, n, results) for n in range(3)]
        summary = [(a.took, a.job_id, repr(a.error)) for a in attempts]
        for attempt in attempts:
            assert attempt.took <= BROKER_TIMEOUT + MARGIN, f"a submit outlasted its bound: {summary}"
        first, *later = attempts
        # The first publish into the alarm is what makes RabbitMQ block the connection: it is held,
        # so that submit either completed or says its task went out (job_id: maybe submitted).
        assert first.job is not None or (first.error is not None and first.error.job_id is not None), summary
        # From then on the client knows it is blocked: it publishes nothing and says why.
        for attempt in later:
            error = attempt.error
            assert isinstance(error, BrokerBlockedError), summary
            assert error.job_id is None, summary
            assert "memory" in error.reason, error.reason
            assert "blocked" in str(error) and error.reason in str(error), str(error)
        assert wait_until(lambda: logged(log, "publish_blocked", running.id) == 1, 30), (
            "the running job's result was never published during the alarm"
        )
        assert client.job_status(running.id).finished_at is None  # recorded only once confirmed

        # Known jobs: those a submit returned or named. Nothing else may have queues on the node.
        known = {running.id} | {a.job_id for a in attempts if a.job_id is not None}
        assert job_queue_ids(management) <= known

        # A submit made while the alarm is on goes on once it clears within its bound.
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(submit, client, 3, results)
            alarm.clear()
            late = pending.result(timeout=BROKER_TIMEOUT + MARGIN + 30)
        assert late.job is not None and late.took <= BROKER_TIMEOUT + MARGIN, (late.took, repr(late.error))
        known.add(late.job.id)

        # After the alarm: every job that was returned or named gets its result, exactly once.
        finished = client.wait(running, timeout=60)
        assert finished.status is JobStatus.SUCCEEDED and finished.output == {"slept": SLEEP}
        assert wait_until(lambda: logged(log, "publish_unblocked", running.id) == 1, 10)
        for attempt in [first, late]:
            if attempt.job is None:  # maybe submitted: the client's answer says where to look
                assert attempt.job_id is not None
                client.connect_to_submitted_job(
                    attempt.job_id,
                    on_finished=lambda job, result: results.setdefault(job.id, []).append(result),
                )
            assert attempt.job_id is not None
            done = client.wait(attempt.job_id, timeout=60)
            assert done.status is JobStatus.SUCCEEDED and isinstance(done.output, dict)
        for job_id in known:
            assert [r.job_id for r in results.get(job_id, [])] == [job_id], (job_id, results)
        # The worker logs and records a result once confirmed: perhaps after its caller has it.
        assert wait_until(lambda: all(logged(log, "job_result_published", j) == 1 for j in known), 10), {
            j: logged(log, "job_result_published", j) for j in known
        }
        succeeded = JobStatus.SUCCEEDED.value
        assert wait_until(lambda: all(client.job_status(j).status == succeeded for j in known), 10)
        for event in ("job_result_dropped", "result_undeliverable", "publish_retrying"):
            assert not [line for line in log.read_text().splitlines() if f"event={event}" in line], event

        # No queue was left behind, by the jobs that were submitted or by those that were not.
        assert wait_until(lambda: not job_queue_ids(management), 20), (
            f"job queues left on the node: {job_queue_ids(management)}; known jobs: {known}"
        )
    finally:
        alarm.clear()  # first: RabbitMQ reads nothing from a blocked connection, its close neither
        client.close()


def test_a_client_blocked_by_an_alarm_closes_within_its_bound(
    make_client: Callable[..., AnyClient], alarm_worker: tuple[Settings, Path], alarm: MemoryAlarm
) -> None:
    """RabbitMQ reads nothing from a blocked connection, its close neither: ``close()`` must not
    wait for the broker's close-ok for as long as the alarm lasts (py-amqp has no bound of its own)."""
    settings, _ = alarm_worker
    client = make_client(settings=settings)
    alarm.raise_()
    blocked = submit(client, 0, {})  # the first publish into the alarm blocks the connection
    assert blocked.error is not None, f"a submit completed during the alarm: {blocked}"
    started = time.monotonic()
    client.close()
    took = time.monotonic() - started
    assert took <= 2 * BROKER_TIMEOUT + MARGIN, f"close() of a blocked client took {took:.1f} s"
