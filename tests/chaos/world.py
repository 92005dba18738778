"""Everything a chaos run starts, of its own: RabbitMQ node(s), Redis, proxies, workers, beat, callers.

Nothing here touches the suite's broker or Redis: the node (or cluster) runs on the ports of
``tests.cluster`` shifted by ``PORT_SHIFT``, Redis and the proxies on free ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.chaos.schedule import Profile
from tests.cluster import BASE_PORT, BASE_PORT_ENV, Cluster, env_port
from tests.support import ROOT, freeze, wait_until

REPO = Path(ROOT)

#: The chaos nodes' ports: the suite's cluster ports plus this (3.10: 5721-5723, 4.3: 5741-5743).
PORT_SHIFT = 40
TASK_QUEUE = "chaos.tasks"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    """``tests/tcp_proxy.py`` on a fixed port, so that it can be frozen, killed and started again."""

    def __init__(self, target_port: int, log: Path, target_host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.target_host = target_host
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "tests" / "tcp_proxy.py"),
                    str(self.target_port),
                    self.target_host,
                    str(self.port),
                ],
                stdout=out,
                stderr=out,
            )
        assert wait_until(lambda: _answers(self.port), 10), f"proxy on {self.port} did not listen"

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def freeze(self) -> None:
        """Stop it, and return only once nothing of it runs: from then on the link is half-open."""
        if self.proc is not None:
            freeze(self.proc.pid)

    def mute_at_publish(self) -> None:
        """From the client's next publish on, nothing the broker sends gets through (no confirm)."""
        said = "muting at the next publish"
        before = self.log.read_text().count(said)
        self.signal(signal.SIGUSR2)
        assert wait_until(lambda: self.log.read_text().count(said) > before, 10), "proxy deaf"

    def kill(self) -> None:
        """Reset every connection. A frozen proxy dies frozen: what it held never reaches anyone
        (a SIGCONT first would let it forward its buffers in the moment before the SIGKILL)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class RedisServer:
    """A Redis of the run's own that keeps its data across a restart (append-only file)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--logfile", str(self.directory / "redis.log"),
            ]
        )  # fmt: skip
        assert wait_until(self.up, 20), f"redis on {self.port} did not start"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def up(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def shutdown(self) -> None:
        """A clean stop: the append-only file is synced, as a production Redis restart keeps it."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def ready(self) -> bool:
        return self.log.exists() and " ready." in self.log.read_text(errors="replace")

    def pool(self) -> list[int]:
        """The pool's processes (the worker's children)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@dataclass
class World:
    """The run's processes and the environment each kind of process gets."""

    directory: Path
    profile: Profile
    seed: int
    cluster: Cluster = field(init=False)
    redis: RedisServer = field(init=False)
    amqp_proxy: Proxy = field(init=False)
    management_proxy: Proxy = field(init=False)
    workers: list[Worker] = field(default_factory=list)
    callers: dict[str, tuple[str, subprocess.Popen[bytes]]] = field(default_factory=dict)
    beat: subprocess.Popen[bytes] | None = None
    generation: int = 0
    #: When callers stop submitting (Unix time); rescuers started later submit until then too.
    until: float = 0.0

    def __post_init__(self) -> None:
        base = env_port(BASE_PORT_ENV, BASE_PORT) + PORT_SHIFT
        self.cluster = Cluster(
            self.directory / "nodes", size=self.profile.nodes, prefix="ebb-chaos", base_port=base
        )
        self.redis = RedisServer(self.directory / "redis")
        self.amqp_proxy = Proxy(self.cluster.node(1).amqp_port, self.directory / "proxy-amqp.log")
        self.management_proxy = Proxy(self.cluster.node(1).management_port, self.directory / "proxy-mgmt.log")

    # --- environments -------------------------------------------------------------------------

    def _common(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EBB_")}
        return env | {
            "EBB_REDIS_URL": self.redis.url,
            "EBB_TASK_QUEUE": TASK_QUEUE,
            "EBB_TASK_QUEUE_TYPE": "quorum" if self.profile.nodes > 1 else "classic",
            "EBB_BROKER_TIMEOUT": "5",
            "EBB_HEARTBEAT": "4",
            "EBB_RECONNECT_TIMEOUT": "60",
            "EBB_AUDIT_INTERVAL": "4",
            "EBB_MANAGEMENT_URL": ";".join(
                [f"http://127.0.0.1:{self.management_proxy.port}"]
                + [self.cluster.node(i).management_url for i in range(2, self.profile.nodes + 1)]
            ),
        }

    def direct_broker_url(self, first: int = 1) -> str:
        order = [first] + [i for i in range(1, self.profile.nodes + 1) if i != first]
        return self.cluster.broker_url(*order)

    def caller_env(self, index: int) -> dict[str, str]:
        proxied = f"amqp://guest:guest@127.0.0.1:{self.amqp_proxy.port}//"
        others = [self.cluster.node(i).amqp_url for i in range(2, self.profile.nodes + 1)]
        env = self._common() | {"EBB_BROKER_URL": ";".join([proxied, *others])}
        if self.profile.nodes > 1 and index % 2:
            env["EBB_QUEUE_TYPE"] = "quorum"
        return env

    def worker_env(self) -> dict[str, str]:
        first = 1 + self.generation % self.profile.nodes
        return self._common() | {"EBB_BROKER_URL": self.direct_broker_url(first)}

    # --- processes ----------------------------------------------------------------------------

    def start_servers(self) -> None:
        self.cluster.start()
        self.redis.start()
        self.amqp_proxy.start()
        self.management_proxy.start()

    def start_worker(self) -> Worker:
        self.generation += 1
        name = f"w{self.generation}"
        log = self.directory / f"worker-{name}.log"
        env = self.worker_env()
        env["EBB_WORKFLOW_MODULES"] = "tests.contract_probe"
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "tasks", "worker", "-l", "INFO", "-c", "2",
                "-P", "prefork", "--without-gossip", "--without-mingle",
                "-n", f"chaos-{name}@%h", "--logfile", str(log),
            ],
            cwd=ROOT, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=(self.directory / f"worker-{name}.err").open("ab"),
        )  # fmt: skip
        worker = Worker(name, proc, log)
        self.workers.append(worker)
        return worker

    def start_beat(self) -> None:
        self.beat = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "tasks", "beat", "-l", "INFO",
                "-s", str(self.directory / "beat-schedule"), "--logfile", str(self.directory / "beat.log"),
            ],
            cwd=ROOT, env=self.worker_env(), start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=(self.directory / "beat.err").open("ab"),
        )  # fmt: skip

    def start_caller(self, proc: str, client: str, index: int, until: float, rescue: list[str]) -> None:
        err = (self.directory / f"{proc}.err").open("ab")
        popen = subprocess.Popen(
            [
                sys.executable, "-m", "tests.chaos.caller", "--client", client, "--proc", proc,
                "--seed", str(self.seed), "--history", str(self.directory / "history.jsonl"),
                "--until", str(until), "--ttl", str(self.profile.ttl), "--rescue", ",".join(rescue),
            ],
            cwd=ROOT, env=self.caller_env(index), stdout=err, stderr=err,
        )  # fmt: skip
        self.callers[proc] = (client, popen)

    def live_callers(self) -> list[str]:
        return [name for name, (_, p) in self.callers.items() if p.poll() is None]

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.kill()
        if self.beat is not None and self.beat.poll() is None:
            os.killpg(self.beat.pid, signal.SIGKILL)
        for _, popen in self.callers.values():
            if popen.poll() is None:
                popen.kill()
        for proxy in (self.amqp_proxy, self.management_proxy):
            proxy.kill()
        self.redis.shutdown()
        self.cluster.stop()


def wait_ready(worker: Worker, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.ready():
            return True
        if worker.proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False
