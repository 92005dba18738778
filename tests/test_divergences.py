"""Where JobClient and AsyncJobClient had diverged: each behaviour, made to happen for real, with both.

(a) A connection that breaks right after the broker confirmed a task: the job was published, so
``submit_job`` returns it and its record never says NOT_SUBMITTED (AsyncJobClient said the submit
failed, and recorded so, when starting its consumers failed after the confirm).
(b) A connection that breaks while a finished job's queues are being deleted: the client deletes
them after it reconnects, instead of leaving them to their TTL.
(c) Two concurrent ``connect_to_submitted_job`` calls for one job on one client: one connects,
the other is told "already connected" (AsyncJobClient connected both, checking before its awaits).

The client talks to RabbitMQ through ``tests/tcp_proxy.py``, which cuts its connection at the
frame that matters: right after a ``basic.ack`` (a), or at a ``queue.delete``, which never reaches
the broker (b).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ebb import InvalidArgumentError, Job, JobClient, JobResult, JobStatus
from ebb.config import Settings
from ebb.records import NOT_SUBMITTED
from tests.async_adapter import AsyncClientAsSync
from tests.conftest import AnyClient, reconnects
from tests.support import ROOT, Management, amqp_endpoint, broker_url_as, wait_until
from tests.tcp_proxy import RESET_AFTER_CONFIRM, RESET_AT_QUEUE_DELETE

#: Long enough that the queues' expiry can explain nothing a test sees.
TTL = 600
#: Every wait a test does on the client, the worker or the broker.
BOUND = 60
#: Connections cut after a confirm in one test (see its docstring).
ROUNDS = 5


class Proxy:
    """``tests/tcp_proxy.py`` in front of the broker, and the lines it prints."""

    def __init__(self, settings: Settings) -> None:
        host, port = amqp_endpoint(settings)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "tcp_proxy.py"), str(port), host],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.next_line())
        self.settings = dataclasses.replace(
            settings,
            broker_url=broker_url_as(settings, host="127.0.0.1", port=self.port),
            reconnect_timeout=BOUND,
        )

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next_line(self, timeout: float = 10) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the proxy printed nothing within {timeout} s") from None

    def arm(self, mode: int, taken: str) -> None:
        """Signal a mode, and wait until the proxy says it took it (see tests/tcp_proxy.py)."""
        os.kill(self.proc.pid, mode)
        assert self.next_line() == taken

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def proxy(settings: Settings) -> Iterator[Proxy]:
    proxy = Proxy(settings)
    yield proxy
    proxy.close()


def test_a_task_the_broker_confirmed_is_submitted_even_if_the_connection_breaks_right_after(
    make_client: Callable[..., AnyClient], proxy: Proxy, worker: Path
) -> None:
    """The broker has the task, a worker runs it: telling the caller the submit failed (and
    recording NOT_SUBMITTED) invites a second submit of a job that runs anyway.

    Several rounds: how far the async client got with the confirm when it notices the break
    varies from run to run (aiormq's tasks): one round alone showed the old bug about 4 times
    in 5, five rounds every time."""
    with make_client(settings=proxy.settings) as client:
        for n in range(1, ROUNDS + 1):
            proxy.arm(RESET_AFTER_CONFIRM, "resetting after the next confirm")
            try:
                job = client.submit_job("demo.echo", {"round": n}, auto_cleanup_after_ttl=TTL)
            except Exception as exc:
                pytest.fail(f"round {n}: submit_job raised {exc!r}, though the broker had confirmed the task")
            assert proxy.next_line() == "reset after a confirm"
            assert client.job_status(job).status != NOT_SUBMITTED
            result = client.wait(job, timeout=BOUND)  # the reconnect consumes the job's queues
            assert result.status is JobStatus.SUCCEEDED and result.output == {"round": n}
            assert client.job_status(job).status == JobStatus.SUCCEEDED.value
            # Back on the broker before the next round: a submit while reconnecting fails, rightly.
            assert wait_until(reconnected(client, n), BOUND), "the client did not reconnect"


def test_queues_whose_delete_the_connection_cut_off_are_deleted_after_the_reconnect(
    make_client: Callable[..., AnyClient], proxy: Proxy, management: Management, worker: Path
) -> None:
    """A finished job's queues must not wait out their TTL (here ten minutes, on the broker)
    because the connection broke under their delete."""
    with make_client(settings=proxy.settings) as client:
        proxy.arm(RESET_AT_QUEUE_DELETE, "resetting at the next queue delete")
        job = client.submit_job("demo.echo", {"deleted": True}, auto_cleanup_after_ttl=TTL, updates=True)
        result = client.wait(job, timeout=BOUND)
        assert result.status is JobStatus.SUCCEEDED and result.output == {"deleted": True}
        assert proxy.next_line() == "reset at a queue delete"
        assert wait_until(reconnected(client, 1), BOUND), "the client did not reconnect"
        assert wait_until(lambda: not management.job_queues(job.id), 30), (
            f"left behind after the reconnect: {sorted(k.value for k in management.job_queues(job.id))}"
        )


def test_of_two_concurrent_connects_to_one_job_one_connects_and_the_other_is_told_already_connected(
    make_client: Callable[..., AnyClient], client_kind: str, management: Management, worker: Path
) -> None:
    """Two connections of one job on one client consume its queues twice; the second caller
    must hear that the job is already connected, and the result comes once."""
    with make_client() as submitter:
        job = submitter.submit_job(
            "demo.sleep", {"seconds": 1, "steps": 2}, auto_cleanup_after_ttl=TTL, updates=True
        )
    finished: list[JobResult] = []

    def on_finished(job: Job, result: JobResult) -> None:
        finished.append(result)

    with make_client() as client:
        outcomes = connect_twice(client, client_kind, str(job.id), on_finished)
        connected = [o for o in outcomes if isinstance(o, Job)]
        refused = [o for o in outcomes if isinstance(o, InvalidArgumentError)]
        assert len(connected) == 1 and len(refused) == 1, f"outcomes: {outcomes!r}"
        assert "already connected" in str(refused[0])
        result = client.wait(job.id, timeout=BOUND)
        assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 1}
        assert wait_until(lambda: not management.job_queues(job.id), 30), "the job's queues were left"
        assert len(finished) == 1, f"on_finished ran {len(finished)} times"


def reconnected(client: AnyClient, times: int) -> Callable[[], bool]:
    return lambda: reconnects(client) >= times


def connect_twice(
    client: AnyClient, kind: str, job_id: str, on_finished: Callable[[Job, JobResult], None]
) -> list[Any]:
    """Both calls at once: two threads on a JobClient, ``asyncio.gather`` on an AsyncJobClient."""
    if kind == "async":
        assert isinstance(client, AsyncClientAsSync)
        aio = client.client

        async def both() -> list[Any]:
            return list(
                await asyncio.gather(
                    aio.connect_to_submitted_job(job_id, on_finished=on_finished),
                    aio.connect_to_submitted_job(job_id, on_finished=on_finished),
                    return_exceptions=True,
                )
            )

        return client._run(both(), timeout=BOUND)
    assert isinstance(client, JobClient)
    outcomes: list[Any] = []
    start = threading.Barrier(2, timeout=10)

    def connect() -> None:
        start.wait()
        try:
            outcomes.append(client.connect_to_submitted_job(job_id, on_finished=on_finished))
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND)
    assert not any(t.is_alive() for t in threads), "a connect_to_submitted_job did not return"
    return outcomes
