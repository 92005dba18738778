"""Faults made to happen for real: connections cut, workers killed, servers restarted."""

from __future__ import annotations

import time
from urllib.parse import quote

import requests

from sdk import Job, JobClient, JobResult, JobStatus
from sdk.config import Settings
from tests.support import Management, wait_until


def close_connection_of(client: JobClient, settings: Settings) -> None:
    """Have the broker close this client's connection, as an operator (or a failover) would."""
    port = client._loop_connection().connection.sock.getsockname()[1]
    auth = (settings.management_user, settings.management_password)
    url = f"{settings.management_url}/api/connections"
    assert wait_until(
        lambda: any(c.get("peer_port") == port for c in requests.get(url, auth=auth, timeout=10).json()), 15
    )
    name = next(
        c["name"] for c in requests.get(url, auth=auth, timeout=10).json() if c.get("peer_port") == port
    )
    response = requests.delete(
        f"{url}/{quote(name, safe='')}",
        auth=auth,
        headers={"X-Reason": "test cuts the caller off"},
        timeout=10,
    )
    assert response.status_code in (200, 204)


def test_client_reconnects_after_broker_closes_its_connection(
    client: JobClient, settings: Settings, management: Management
) -> None:
    finished: list[JobResult] = []
    progress: list[tuple[int, int]] = []
    job = client.submit_job(
        "demo.sleep",
        {"seconds": 3, "steps": 6},
        on_finished=lambda j, r: finished.append(r),
        on_progress=lambda j, p: progress.append((p.attempt, p.seq)),
    )
    assert wait_until(lambda: len(progress) >= 1, 10)
    close_connection_of(client, settings)
    other = client_submit_when_back(client)
    result = client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED
    assert len(finished) == 1
    assert client._loop.reconnects >= 1
    assert len(progress) == len(set(progress)), "a progress message was delivered twice"
    assert client.wait(other, timeout=30).succeeded
    assert wait_until(lambda: not management.job_queues(job.id), 10)


def client_submit_when_back(client: JobClient) -> Job:
    """Submitting while the client reconnects fails fast; once it is back, it works."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return client.submit_job("demo.echo", {"after": "reconnect"})
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
