"""Real servers only: RabbitMQ (with management API), Redis, and a real Celery worker process.

A missing server fails the run; nothing here skips. Each test session uses a task queue of its
own, so a worker left running elsewhere on the machine cannot steal the tests' jobs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

os.environ.setdefault("EBB_TASK_QUEUE", f"ebb.test.{os.getpid()}")

from sdk import JobClient
from sdk.config import Settings
from tests.support import ROOT, Management


def _check_servers(settings: Settings) -> None:
    problems = []
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=3).close()
    except OSError as exc:
        problems.append(f"RabbitMQ AMQP at 127.0.0.1:5672: {exc} (start it: rabbitmq-server -detached)")
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
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "-l",
            "INFO",
            "-c",
            "3",
            "-P",
            "prefork",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"test{os.getpid()}@%h",
            "--logfile",
            str(log),
        ],
        cwd=ROOT,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.exists() and " ready." in log.read_text():
            break
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}: {log.read_text() if log.exists() else ''}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("worker did not become ready within 60 s")
    yield log
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    with JobClient(settings=settings) as client:  # the session's task queue goes with it
        client._loop.call(lambda: client._publish_channel.queue_delete(settings.task_queue))


@pytest.fixture
def client(settings: Settings, worker: Path) -> Iterator[JobClient]:
    with JobClient(settings=settings) as job_client:
        yield job_client
