"""No caller call hangs: a half-open connection and a connection cut mid-confirm, made for real.

The client talks to RabbitMQ through ``tests/tcp_proxy.py``. SIGSTOP freezes the proxy, so the
client's connection goes half-open (no FIN, no RST ever arrives), as when a NAT or a firewall
forgets it; SIGUSR2 holds back what the broker sends from the task's publish on, so its confirm
never comes (whether the client pipelines its queue declares, as JobClient does, or awaits them
first, as AsyncJobClient does). Both tests run with both clients.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebb import BrokerUnavailableError, JobStatus
from ebb.config import Settings
from tests.conftest import AnyClient, reconnects
from tests.support import ROOT, amqp_endpoint, broker_url_as, freeze

HEARTBEAT = 2.0
#: A job cut off mid-submit may leave its queues behind (the task may not have arrived): short TTL.
TTL = 20


@pytest.fixture
def proxy(settings: Settings) -> Iterator[subprocess.Popen[str]]:
    host, port = amqp_endpoint(settings)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "tcp_proxy.py"), str(port), host],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.port = int(proc.stdout.readline())  # type: ignore[attr-defined]
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def through(proxy: subprocess.Popen[str], settings: Settings) -> Settings:
    port = proxy.port  # type: ignore[attr-defined]
    return dataclasses.replace(
        settings,
        broker_url=broker_url_as(settings, host="127.0.0.1", port=port),
        heartbeat=HEARTBEAT,
        reconnect_timeout=60,
    )


def test_submit_on_a_half_open_connection_fails_within_two_heartbeats_then_recovers(
    settings: Settings, make_client: Callable[..., AnyClient], worker: Path, proxy: subprocess.Popen[str]
) -> None:
    with make_client(settings=through(proxy, settings)) as client:
        assert client.wait(
            client.submit_job("demo.echo", {"n": 1}, auto_cleanup_after_ttl=TTL), timeout=30
        ).succeeded
        freeze(proxy.pid)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError) as caught:
            client.submit_job("demo.echo", {"n": 2}, auto_cleanup_after_ttl=TTL)
        elapsed = time.monotonic() - started
        # Two heartbeat intervals of silence, counted from the last frame before the freeze.
        assert elapsed < 2 * HEARTBEAT + 1.5, f"took {elapsed:.1f} s"
        assert "half-open" in str(caught.value) or "connection" in str(caught.value)
        time.sleep(1)
        os.kill(proxy.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:  # the client reconnects by itself; submit works again once it has
            try:
                job = client.submit_job("demo.echo", {"n": 3}, auto_cleanup_after_ttl=TTL)
                break
            except BrokerUnavailableError:
                assert time.monotonic() < deadline, "the client did not reconnect within 30 s"
                time.sleep(0.5)
        result = client.wait(job, timeout=30)
        assert result.status is JobStatus.SUCCEEDED and result.output == {"n": 3}
        assert reconnects(client) >= 1


def test_connection_reset_while_waiting_for_the_confirm_is_broker_unavailable(
    settings: Settings, make_client: Callable[..., AnyClient], worker: Path, proxy: subprocess.Popen[str]
) -> None:
    client = make_client(settings=through(proxy, settings))
    try:
        assert client.wait(
            client.submit_job("demo.echo", {"n": 1}, auto_cleanup_after_ttl=TTL), timeout=30
        ).succeeded
        os.kill(proxy.pid, signal.SIGUSR2)  # the broker's answers stop at the task: no confirm arrives
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "muting at the next publish"
        outcome: list[BaseException] = []

        def submit() -> None:
            try:
                client.submit_job("demo.echo", {"n": 2}, auto_cleanup_after_ttl=TTL)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=submit)
        thread.start()
        time.sleep(0.5)  # the task is published and its confirm awaited
        proxy.kill()  # connection reset under the waiting call
        thread.join(2 * HEARTBEAT + 5)
        assert not thread.is_alive(), "submit_job still waits after the connection was reset"
        assert len(outcome) == 1
        error = outcome[0]
        assert isinstance(error, BrokerUnavailableError), repr(error)
        # The task may have reached the broker: the error names the job, and nothing is lost.
        assert error.job_id is not None
        assert "do not submit it again" in str(error)
    finally:
        client.close()
    with make_client() as direct:
        direct.connect_to_submitted_job(error.job_id)
        result = direct.wait(error.job_id, timeout=30)
        assert result.status is JobStatus.SUCCEEDED and result.output == {"n": 2}
