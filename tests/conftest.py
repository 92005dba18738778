"""Real servers only: RabbitMQ (with management API), Redis, and a real Celery worker process.

A missing server fails the run; nothing here skips. Each test session uses a task queue of its
own, so a worker left running elsewhere on the machine cannot steal the tests' jobs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import requests

os.environ.setdefault("EBB_TASK_QUEUE", f"ebb.test.{os.getpid()}")

from ebb import JobClient
from ebb.config import Settings
from tests.async_adapter import AsyncClientAsSync
from tests.support import ClientProcess, Management, amqp_endpoint, start_worker, stop_worker


def _check_servers(settings: Settings) -> None:
    problems = []
    host, port = amqp_endpoint(settings)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        problems.append(f"RabbitMQ AMQP at {host}:{port}: {exc} (start it: rabbitmq-server -detached)")
    try:
        requests.get(
            f"{settings.management_url}/api/overview",
            auth=(settings.management_user, settings.management_password),
            timeout=5,
        ).raise_for_status()
    except requests.RequestException as exc:
        problems.append(
            f"RabbitMQ management API at {settings.management_url}: {exc} "
            "(rabbitmq-plugins enable rabbitmq_management)"
        )
    try:
        redis.Redis.from_url(settings.redis_url, socket_timeout=3).ping()
    except redis.RedisError as exc:
        problems.append(f"Redis at {settings.redis_url}: {exc} (start redis-server)")
    if problems:
        pytest.fail("integration servers missing:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def published_contract_holds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every message a test worker sent is checked against docs/contract/ (tests/contract_probe.py)."""
    log = tmp_path_factory.mktemp("contract") / "messages.log"
    log.touch()
    os.environ["EBB_TEST_CONTRACT_LOG"] = str(log)
    yield log
    lines = log.read_text().splitlines()
    violations = [line for line in lines if not line.startswith("ok ")]
    assert not violations, f"{len(violations)} of {len(lines)} published messages break the contract:\n" + (
        "\n".join(violations[:10])
    )


@pytest.fixture(scope="session")
def settings() -> Settings:
    current = Settings.from_env()
    _check_servers(current)
    return current


@pytest.fixture(scope="session")
def management(settings: Settings) -> Management:
    return Management(settings)


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real ``celery -A tasks worker`` subprocess; yields its log file."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    try:
        proc = start_worker(log)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield log
    stop_worker(proc)
    with JobClient(settings=settings) as client:  # the session's task queues go with it
        channel = client._publish_channel
        for queue in (settings.task_queue, f"{settings.task_queue}.audit"):
            client._loop.call(functools.partial(channel.queue_delete, queue))


@pytest.fixture
def client(settings: Settings, worker: Path) -> Iterator[JobClient]:
    with JobClient(settings=settings) as job_client:
        yield job_client


AnyClient = JobClient | AsyncClientAsSync


@pytest.fixture(params=["sync", "async"])
def client_kind(request: pytest.FixtureRequest) -> str:
    """Tests that take this run once with ``JobClient`` and once with ``AsyncJobClient``."""
    return str(request.param)


@pytest.fixture(params=["sync", "async"], ids=["sync_caller", "async_caller"])
def caller_kind(request: pytest.FixtureRequest) -> str:
    """The kind of client a killed caller process ran (``tests.support.ClientProcess(kind=...)``)."""
    return str(request.param)


def reconnects(client: AnyClient) -> int:
    """How often the client under test replaced its broker connection."""
    return client.reconnects if isinstance(client, AsyncClientAsSync) else client._loop.reconnects


@pytest.fixture
def make_client(client_kind: str, settings: Settings) -> Callable[..., AnyClient]:
    """A factory for the client under test: ``make_client(settings=...)``."""

    def make(settings: Settings = settings) -> AnyClient:
        return JobClient(settings=settings) if client_kind == "sync" else AsyncClientAsSync(settings=settings)

    return make


@pytest.fixture
def any_client(make_client: Callable[..., AnyClient], worker: Path) -> Iterator[AnyClient]:
    """The client under test (sync, then async), connected to the session's worker."""
    with make_client() as job_client:
        yield job_client


@pytest.fixture(autouse=True)
def _no_leftover_callers() -> Iterator[None]:
    """A failed test must not leave a caller process holding consumers on its queues."""
    yield
    while ClientProcess.alive:
        caller = ClientProcess.alive.pop()
        if caller.proc.poll() is None:
            caller.kill()


@contextlib.contextmanager
def throwaway_vhost(settings: Settings, prefix: str = "ebb-test") -> Iterator[str]:
    """A vhost of its own (no policies), deleted afterwards: an audit there sees only its queues."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    api = f"{settings.management_url}/api"
    auth = (settings.management_user, settings.management_password)
    requests.put(f"{api}/vhosts/{quote(vhost, safe='')}", auth=auth, timeout=10).raise_for_status()
    requests.put(
        f"{api}/permissions/{quote(vhost, safe='')}/{quote(settings.management_user, safe='')}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
        auth=auth,
        timeout=10,
    ).raise_for_status()
    try:
        yield vhost
    finally:
        requests.delete(f"{api}/vhosts/{quote(vhost, safe='')}", auth=auth, timeout=10).raise_for_status()


@pytest.fixture
def private_vhost(settings: Settings) -> Iterator[str]:
    """A throw-away vhost (no policies): an audit there neither sees nor marks other tests' queues."""
    with throwaway_vhost(settings) as vhost:
        yield vhost
        memory = redis.Redis.from_url(settings.redis_url, socket_timeout=3)
        stale = list(memory.scan_iter(match=f"ebb:audit:{vhost}:*"))
        if stale:
            memory.delete(*stale)
