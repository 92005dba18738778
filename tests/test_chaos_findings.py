"""What the chaos run (tests/chaos) found, each sequence of faults made to happen on purpose.

- A submit whose confirm never comes: with the callers' link frozen, ``submit_job`` raised (as it
  must: unconfirmed) and the task was lost with the connection, or arrived late; a caller that did
  as the error said (``connect_to_submitted_job``) waited for ever, or was told the job had
  expired. Now the client sends the task again after reconnecting, and the job runs once.
- A connection lost while the client deletes a finished job's queues (``stop_app`` right after a
  result): ``on_finished`` had run, but ``wait()`` never returned.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebb import BrokerUnavailableError, Job, JobResult, JobStatus
from ebb.config import Settings
from tests.chaos.world import Proxy
from tests.conftest import AnyClient
from tests.support import Management, amqp_endpoint, private_worker, wait_until


@pytest.fixture
def proxied(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Proxy, Path]]:
    """A caller's settings through a proxy, and a worker of their own task queue (direct)."""
    log = tmp_path / "worker.log"
    # Two pool processes: a copy of a task sent again could run at once, if nothing stopped it.
    with private_worker(settings, log, "-c", "2", name="unconfirmed") as private:
        host, port = amqp_endpoint(settings)
        proxy = Proxy(port, tmp_path / "proxy.log", host)
        proxy.start()
        caller = dataclasses.replace(
            private,
            broker_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}//",
            heartbeat=2.0,
            broker_timeout=3.0,
        )
        yield caller, proxy, log
        proxy.kill()


def _unconfirmed_submit(client: AnyClient) -> uuid.UUID:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as raised:
        # Long enough that a copy sent again arrives while the first one runs.
        client.submit_job("demo.sleep", {"seconds": 6, "steps": 1})
    assert time.monotonic() - started < 3.0 + 3, "the submit outlived its bound"
    assert raised.value.job_id is not None, "an unconfirmed task must name its job"
    assert "sends it again" in str(raised.value)
    return raised.value.job_id


def _connect_when_back(
    client: AnyClient, job_id: uuid.UUID, on_finished: Callable[[Job, JobResult], None]
) -> None:
    def connected() -> bool:
        try:
            client.connect_to_submitted_job(job_id, on_finished=on_finished)
            return True
        except BrokerUnavailableError:  # still reconnecting
            return False

    assert wait_until(connected, 30), "the client never reconnected"


@pytest.mark.parametrize(
    "arrives", [False, True], ids=["task_lost_with_connection", "task_arrived_unconfirmed"]
)
def test_unconfirmed_task_is_sent_again_and_runs_once(
    proxied: tuple[Settings, Proxy, Path], make_client: Callable[..., AnyClient], arrives: bool
) -> None:
    settings, proxy, log = proxied
    results: list[JobResult] = []
    with make_client(settings=settings) as client:
        assert client.wait(client.submit_job("demo.echo", {"warm": 1}), timeout=30).succeeded
        # Lost: the link freezes before the submit, so its frames never leave the proxy. Arrived:
        # the proxy forwards the publish and drops everything after (the confirm never comes).
        if arrives:
            proxy.mute_at_publish()
        else:
            proxy.freeze()
        job_id = _unconfirmed_submit(client)
        if arrives:
            assert wait_until(lambda: f"event=job_started job_id={job_id}" in log.read_text(), 20)
        proxy.kill()  # the frozen link is reset: what it held is gone
        proxy.start()
        _connect_when_back(client, job_id, lambda job, result: results.append(result))
        result = client.wait(job_id, timeout=30)
    assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 6}
    assert len(results) == 1
    worker_log = log.read_text()
    assert worker_log.count(f"event=job_started job_id={job_id}") == 1, "the job ran twice"
    if arrives:  # the copy sent again reaches the worker while the job runs: skipped
        assert wait_until(lambda: f"event=job_copy_skipped job_id={job_id}" in log.read_text(), 15)
    else:
        assert f"event=job_copy_skipped job_id={job_id}" not in worker_log


def test_wait_returns_a_delivered_result_when_the_connection_breaks_while_its_queues_are_deleted(
    proxied: tuple[Settings, Proxy, Path], make_client: Callable[..., AnyClient]
) -> None:
    settings, proxy, _ = proxied
    results: list[JobResult] = []

    def on_finished(job: Job, result: JobResult) -> None:
        results.append(result)
        proxy.kill()  # the link resets right after the callback: the queue deletes come next

    with make_client(settings=settings) as client:
        job = client.submit_job("demo.echo", {"n": 1}, on_finished=on_finished, updates=True)
        started = time.monotonic()
        result = client.wait(job, timeout=30)
        assert time.monotonic() - started < 15
        proxy.start()  # the reconnect does the deletes it was cut off from
        assert wait_until(lambda: not Management(settings).job_queues(job.id), 30), "queues left"
    assert result.status is JobStatus.SUCCEEDED and len(results) == 1
