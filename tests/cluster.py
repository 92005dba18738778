"""A local RabbitMQ cluster for the tests (and by hand): three nodes of the machine's rabbitmq-server.

Each node has its own name, AMQP, management and distribution ports, data and log directories,
all under one directory, and the nodes share an Erlang cookie of their own and a private epmd, so
the machine's own broker (rabbit@localhost, 5672) is never touched. Nodes 2 and 3 join node 1.

By hand::

    .venv/bin/python -m tests.cluster up      # prints EBB_* settings for a caller on node 2
    .venv/bin/python -m tests.cluster down

The tests start it once per module that needs it (``tests/test_cluster.py``) and stop it after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
#: Ports of node i (1-based): AMQP 5680+i, management 15680+i, distribution 25680+i,
#: Prometheus 15780+i; epmd 4390. (15692 is left to the machine's own Prometheus plugin.)
BASE_PORT = 5680
EPMD_PORT = 4390
DEFAULT_DIR = Path(tempfile.gettempdir()) / "ebb-cluster"
START_TIMEOUT = 90.0


@dataclass(frozen=True)
class Node:
    index: int
    base: Path

    @property
    def name(self) -> str:
        return f"ebb-n{self.index}@localhost"

    @property
    def amqp_port(self) -> int:
        return BASE_PORT + self.index

    @property
    def management_port(self) -> int:
        return 10000 + BASE_PORT + self.index

    @property
    def dist_port(self) -> int:
        return 20000 + BASE_PORT + self.index

    @property
    def prometheus_port(self) -> int:
        return 10100 + BASE_PORT + self.index

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def directory(self) -> Path:
        return self.base / f"n{self.index}"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def pid(self) -> int | None:
        try:
            return int((self.directory / "pid").read_text().strip())
        except (OSError, ValueError):
            return None


class Cluster:
    def __init__(
        self, base: Path = DEFAULT_DIR, size: int = 3, *, extra_conf: str = "", plugins: tuple[str, ...] = ()
    ) -> None:
        """``extra_conf``: lines added to every node's rabbitmq.conf; ``plugins``: beyond management."""
        self.base = base
        self.nodes = [Node(i, base) for i in range(1, size + 1)]
        self.extra_conf = extra_conf
        self.plugins = ("rabbitmq_management", *plugins)

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    # --- settings for callers and workers ----------------------------------------------------

    def broker_url(self, *order: int) -> str:
        """kombu's failover list (``;``-separated), the nodes in this order."""
        return ";".join(self.node(i).amqp_url for i in order)

    def management_url(self, *order: int) -> str:
        return ";".join(self.node(i).management_url for i in order)

    # --- processes -------------------------------------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {**os.environ, "HOME": str(self.base), "ERL_EPMD_PORT": str(EPMD_PORT)}
        if node is not None:
            env |= {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_PORT": str(node.amqp_port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(node.directory / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.directory / "log"),
                "RABBITMQ_CONFIG_FILE": str(node.directory / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.directory / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(node.directory / "pid"),
            }
        return env

    def ctl(self, index: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node i>`` with the cluster's cookie and epmd; raises when it fails."""
        return subprocess.run(
            [CTL, "-n", self.node(index).name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def _prepare(self, node: Node) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        (node.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {node.amqp_port}\n"
            f"management.tcp.port = {node.management_port}\n"
            "loopback_users = none\n"
            # Its own, faster statistics: consumer counts settle in about a second.
            "collect_statistics_interval = 1000\n"
            f"prometheus.tcp.port = {node.prometheus_port}\n"
            f"{self.extra_conf}\n"
        )
        (node.directory / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")

    def start_node(self, index: int) -> None:
        """Start node i (again) and wait until it runs and its management API answers."""
        node = self.node(index)
        self._prepare(node)
        subprocess.run([SERVER, "-detached"], env=self._env(node), check=True, timeout=60)
        self._await(node)

    def _await(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.ctl(node.index, "await_startup", "--timeout", "10", timeout=30)
                requests.get(
                    f"{node.management_url}/api/overview", auth=("guest", "guest"), timeout=5
                ).raise_for_status()
                return
            except (subprocess.SubprocessError, requests.RequestException) as exc:
                if time.monotonic() > deadline:
                    log = node.directory / "log" / f"{node.name}.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"{node.name} did not start in {START_TIMEOUT:g} s: {exc}\n{tail}"
                    ) from exc
                time.sleep(1)

    def start(self) -> None:
        """A fresh cluster: every node started (in parallel), then 2..n joined to node 1."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        cookie = self.base / ".erlang.cookie"
        cookie.write_text(f"EBBTESTCLUSTER{os.getpid()}")
        cookie.chmod(0o400)
        for node in self.nodes:
            self._prepare(node)
            subprocess.run([SERVER, "-detached"], env=self._env(node), check=True, timeout=60)
        for node in self.nodes:
            self._await(node)
        first = self.nodes[0].name
        for node in self.nodes[1:]:
            self.ctl(node.index, "stop_app")
            self.ctl(node.index, "join_cluster", first)
            self.ctl(node.index, "start_app")
            self._await(node)

    def stop_node(self, index: int) -> None:
        """A clean stop of node i (its process exits; its data stays for a restart)."""
        node = self.node(index)
        pid = node.pid()
        subprocess.run([CTL, "-n", node.name, "stop"], env=self._env(), capture_output=True, timeout=120)
        self._wait_gone(pid)

    def kill_node(self, index: int) -> None:
        """SIGKILL node i's Erlang VM: the node is lost at once, as in a crash."""
        pid = self.node(index).pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self._wait_gone(pid)

    def _wait_gone(self, pid: int | None) -> None:
        deadline = time.monotonic() + 60
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every node and the private epmd; leaves the machine's own broker alone."""
        for node in self.nodes:
            if node.pid() is not None:
                self.kill_node(node.index)
        subprocess.run(["epmd", "-kill"], env=self._env(), capture_output=True, timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A local three-node RabbitMQ cluster for Ebb's tests.")
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"data and logs (default {DEFAULT_DIR})"
    )
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir)
    if args.command == "down":
        cluster.stop()
        print("cluster stopped")
        return 0
    cluster.start()
    for node in cluster.nodes:
        print(f"# {node.name}: {node.amqp_url}  {node.management_url}")
    print(f"export EBB_BROKER_URL='{cluster.broker_url(2, 1, 3)}'")
    print(f"export EBB_MANAGEMENT_URL='{cluster.management_url(2, 1, 3)}'")
    print(f"export EBB_TEST_RABBITMQ_NODE={cluster.node(2).name}")
    print(f"# rabbitmqctl on these nodes: HOME={cluster.base} ERL_EPMD_PORT={EPMD_PORT} {CTL} -n <node>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
