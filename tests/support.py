"""Test helpers that look at the broker the way an operator would: through the management API."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

import amqp
import requests
from kombu.connection import Connection

from ebb.config import Settings
from ebb.contract import QueueKind, TaskRequest, job_queue, queue_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The RabbitMQ node ``rabbitmqctl`` acts on (``-n``): the one EBB_BROKER_URL points at, when the
#: suite runs against a second broker or a cluster node. Unset: rabbitmqctl's default node.
RABBITMQ_NODE_ENV = "EBB_TEST_RABBITMQ_NODE"
#: The rabbitmqctl command itself (split like a shell would): another broker's own CLI, say
#: ``chroot /srv/trixie rabbitmqctl`` for a RabbitMQ 4 in a chroot. Unset: ``rabbitmqctl``.
RABBITMQCTL_ENV = "EBB_TEST_RABBITMQCTL"


def amqp_endpoint(settings: Settings) -> tuple[str, int]:
    """Host and port of the (first) broker of EBB_BROKER_URL: tests never assume 5672."""
    parts = urlsplit(settings.broker_url.split(";")[0])
    return parts.hostname or "127.0.0.1", parts.port or 5672


def redis_endpoint(settings: Settings) -> tuple[str, int]:
    parts = urlsplit(settings.redis_url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def broker_url_as(
    settings: Settings,
    user: str | None = None,
    password: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    vhost: str | None = None,
) -> str:
    """EBB_BROKER_URL's (first) broker, with what is given replaced: tests never assume 5672."""
    parts = urlsplit(settings.broker_url.split(";")[0])
    default_host, default_port = amqp_endpoint(settings)
    user = user if user is not None else (parts.username or "guest")
    password = password if password is not None else (parts.password or "guest")
    netloc = (
        f"{quote(user, safe='')}:{quote(password, safe='')}@{host or default_host}:{port or default_port}"
    )
    path = f"/{quote(vhost, safe='')}" if vhost is not None else parts.path
    return urlunsplit(parts._replace(scheme="amqp", netloc=netloc, path=path))


def rabbitmqctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``rabbitmqctl`` on the tests' node (EBB_TEST_RABBITMQ_NODE), raising when it fails."""
    node = os.environ.get(RABBITMQ_NODE_ENV)
    ctl = shlex.split(os.environ.get(RABBITMQCTL_ENV) or "rabbitmqctl")
    command = [*ctl, *(["-n", node] if node else []), *args]
    return subprocess.run(command, check=True, timeout=timeout, capture_output=True, text=True)


@dataclass
class Management:
    """Read-only view of queues; never touches a queue over AMQP, so never renews a TTL."""

    settings: Settings

    def _get(self, path: str, **params: Any) -> Any:
        response = requests.get(
            f"{self.settings.management_url}/api/{path}",
            params=params,
            auth=(self.settings.management_user, self.settings.management_password),
            timeout=10,
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def queue(self, name: str) -> dict[str, Any] | None:
        data = self._get(f"queues/{quote(self.settings.vhost, safe='')}/{quote(name, safe='')}")
        return data if isinstance(data, dict) else None

    def job_queues(self, job_id: uuid.UUID) -> dict[QueueKind, dict[str, Any]]:
        found = {}
        for kind in QueueKind:
            info = self.queue(queue_name(job_id, kind))
            if info is not None:
                found[kind] = info
        return found

    def all_job_queue_names(self) -> list[str]:
        data = self._get(f"queues/{quote(self.settings.vhost, safe='')}", columns="name")
        return [q["name"] for q in data if q["name"].startswith("jobs.")]


def free_port() -> int:
    """A TCP port nobody listens on now (127.0.0.1), for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def ctrl_c_reaches_children() -> Iterator[None]:
    """Children started inside get SIGINT as from a terminal's Ctrl-C. A run started in the
    background (``&``, ``nohup``) has SIGINT ignored and every child inherits that, so Ctrl-C
    would do nothing; a handled signal, unlike an ignored one, is reset to its default by exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped.

    ``kill`` returns before the stop takes hold: on a loaded machine a thread of a frozen proxy
    went on forwarding for a moment (52 of 200 bytes sent right after the signal got through),
    which let a "lost" task reach the broker.
    """
    os.kill(pid, signal.SIGSTOP)
    tasks = Path(f"/proc/{pid}/task")

    def stopped() -> bool:
        states = []
        for task in tasks.iterdir():
            with suppress(FileNotFoundError):  # a thread that ended meanwhile
                states.append((task / "stat").read_text().rpartition(") ")[2][:1])
        return all(state in "Tt" for state in states)

    assert wait_until(stopped, 10, interval=0.001), f"process {pid} did not stop"


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class ClientProcess:
    """A caller in its own process, so a test can kill it with SIGKILL like a crash would."""

    alive: ClassVar[list[ClientProcess]] = []  # killed after each test by conftest, whatever the outcome

    def __init__(
        self, workflow: str, params: dict[str, Any], ttl: float, callbacks: str = "all", kind: str = "sync"
    ):
        """``kind``: the caller runs a ``JobClient`` (``"sync"``) or an ``AsyncJobClient`` (``"async"``)."""
        self.kind = kind
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "tests", "client_process.py"),
                workflow,
                json.dumps(params),
                str(ttl),
                callbacks,
                kind,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        ClientProcess.alive.append(self)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client process died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.job_json = line.strip()

    def read_event(self, timeout: float = 30) -> str:
        """The next line the client printed (one per callback it received)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line and time.monotonic() > deadline:
            raise TimeoutError("client process printed nothing")
        return line.strip()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no close(), no goodbye to the broker
        self.proc.wait(10)


def start_worker(log: Path, *extra_args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``celery -A tasks worker`` and return once it says it is ready.

    Every test worker also loads ``tests.contract_probe``, which checks each message it
    publishes against the published contract (docs/contract/).
    """
    return start_celery_worker("tasks", log, *extra_args, env=env)


def probed(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` for a worker that also loads the contract probe."""
    merged = {**os.environ, **(env or {})}
    modules = [m for m in merged.get("EBB_WORKFLOW_MODULES", "").split(",") if m.strip()]
    merged["EBB_WORKFLOW_MODULES"] = ",".join([*modules, "tests.contract_probe"])
    return merged


def start_celery_worker(
    app: str, log: Path, *extra_args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``celery -A app worker`` (Ebb's app or one of yours) once it says it is ready."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
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
            f"test{os.getpid()}-{uuid.uuid4().hex[:6]}@%h",
            "--logfile",
            str(log),
            *extra_args,
        ],
        cwd=ROOT,
        env=probed(env),
        start_new_session=True,  # its own process group: a test can SIGKILL it with its children
    )
    if not wait_until(lambda: log.exists() and " ready." in log.read_text(), 60):
        proc.kill()
        raise RuntimeError(f"worker did not become ready: {log.read_text() if log.exists() else ''}")
    return proc


@contextmanager
def private_worker(
    settings: Settings,
    log: Path,
    *extra_args: str,
    name: str = "private",
    env: dict[str, str] | None = None,
) -> Iterator[Settings]:
    """A worker started for one test on a task queue of its own; yields the callers' settings.

    A test that restarts the broker, or needs a fresh pool process, then never shares a worker
    with the rest of the suite. The queue goes with the worker.
    """
    queue = f"{settings.task_queue}.{name}.{uuid.uuid4().hex[:6]}"
    proc = start_worker(log, *extra_args, env={**(env or {}), "EBB_TASK_QUEUE": queue})
    try:
        yield replace(settings, task_queue=queue)
    finally:
        stop_worker(proc)
        host, port = amqp_endpoint(settings)
        with amqp.Connection(f"{host}:{port}", userid="guest", password="guest") as admin:
            for name in (queue, f"{queue}.audit"):  # the audit's queue (tasks.install) too
                admin.channel().queue_delete(name)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def kill_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and its pool processes at once, like a machine dying under it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


class _Exploit:
    """Unpickling this runs code: exactly what a worker must never do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def publish_pickled_job(settings: Settings, job_id: uuid.UUID, marker: Path) -> None:
    """An ``ebb.run_job`` message in pickle whose unpickling would create ``marker``."""
    request = TaskRequest(job_id, "demo.echo", {}, frozenset({QueueKind.RESULT}), 30.0)
    body = pickle.dumps(([request.to_celery_arg(), _Exploit(str(marker))], {}, {}))
    headers = {"lang": "py", "task": "ebb.run_job", "id": str(job_id), "root_id": str(job_id)}
    with Connection(settings.broker_url) as connection:
        channel = connection.channel()
        job_queue(job_id, QueueKind.RESULT, timedelta(seconds=30)).queue_declare(channel=channel)
        channel.basic_publish(
            amqp.Message(body, content_type="application/x-python-serialize", application_headers=headers),
            exchange="",
            routing_key=settings.task_queue,
        )
        channel.close()
