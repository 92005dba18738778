"""Local RabbitMQ nodes for the tests (and by hand): a three-node cluster, or one node of your own.

Each node has its own name, AMQP, management and distribution ports, data and log directories,
all under one directory, and the nodes share an Erlang cookie of their own and a private epmd, so
the broker a suite runs against is never touched. Nodes 2 and 3 join node 1.

Which rabbitmq-server runs them, and on which ports, comes from the environment, so that the
3.10 and the 4.3 suites (``./dev test`` runs both at once) start theirs side by side:

- ``EBB_TEST_RABBITMQ_ROOT``: a chroot holding the rabbitmq-server to run (``./dev`` builds one of
  RabbitMQ 4.3); unset or empty: the machine's own, /usr/lib/rabbitmq/bin. With a root, the node
  directories live inside it (``<root>/tmp/ebb-nodes-…``, linked from ``base/nodes``) and every
  path a node is given is the one it sees there (``Node.seen``). /proc, /dev and /etc/hosts must
  be in place in the root (``./dev`` does it).
- ``EBB_TEST_NODE_BASE_PORT`` (5680; the 4.3 suite 5700): node i listens on AMQP base+i,
  management 10000+base+i, distribution 20000+base+i, Prometheus 10100+base+i.
- ``EBB_TEST_NODE_EPMD_PORT`` (4390; the 4.3 suite 4391): the nodes' private epmd. ``stop()``
  ends it only once no node at all is registered there.

By hand::

    .venv/bin/python -m tests.cluster up      # prints EBB_* settings for a caller on node 2
    .venv/bin/python -m tests.cluster down

The tests start it once per module that needs it (``tests/test_cluster.py``) and stop it after.

One standalone node of your own (a TLS-only broker, say): a ``Cluster`` of ``size=1`` with its
own name ``prefix`` and ports (``base_port``: the node listens on base_port+1 etc.), ``plugins``
beyond management, ``files`` copied where the node can read them (``Node.file(name)`` is the path
to write into its configuration), ``listeners`` replacing the plain AMQP/HTTP listener lines of
its rabbitmq.conf, and ``extra_conf`` appended::

    def tls_listeners(node: Node) -> str:
        return (f"listeners.tcp = none\\nlisteners.ssl.default = {node.amqp_port}\\n"
                f"ssl_options.cacertfile = {node.file('ca.pem')}\\n...")

    broker = Cluster(base, size=1, prefix="ebb-tls", base_port=5710, plugins=("rabbitmq_prometheus",),
                     files={"ca.pem": certs.ca, ...}, listeners=tls_listeners)
    broker.start()   # returns once rabbitmqctl await_startup and its AMQP and management ports answer
    ...
    broker.stop()

With the default listeners a node is started once its management API answers guest:guest over
HTTP; with ``listeners`` of your own, once ``await_startup`` returns and its ``amqp_port`` and
``management_port`` accept TCP connections (``Node.amqp_url``/``management_url`` are the plain
forms: build your own for TLS).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from ebb.config import Settings

BIN = "/usr/lib/rabbitmq/bin"
#: Ports of node i (1-based): AMQP 5680+i, management 15680+i, distribution 25680+i,
#: Prometheus 15780+i; epmd 4390. (15692 is left to the machine's own Prometheus plugin.)
BASE_PORT = 5680
EPMD_PORT = 4390
ROOT_ENV = "EBB_TEST_RABBITMQ_ROOT"
BASE_PORT_ENV = "EBB_TEST_NODE_BASE_PORT"
EPMD_PORT_ENV = "EBB_TEST_NODE_EPMD_PORT"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "ebb-cluster"
START_TIMEOUT = 90.0


def env_root() -> Path | None:
    """The chroot of EBB_TEST_RABBITMQ_ROOT, or None for the machine's own rabbitmq-server."""
    value = os.environ.get(ROOT_ENV, "").strip()
    return Path(value) if value else None


def env_port(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def redis_url(db: int) -> str:
    """The suite's Redis (EBB_REDIS_URL), database ``db``: test brokers' registries and audit
    memories stay apart from the suite's, and on the suite's own server (the 4.3 suite: 6380)."""
    return urlunsplit(urlsplit(Settings.from_env().redis_url)._replace(path=f"/{db}"))


@dataclass(frozen=True)
class Node:
    index: int
    #: The directory holding the node directories, as this machine sees it.
    base: Path
    base_port: int = BASE_PORT
    prefix: str = "ebb-n"
    #: The chroot the node runs in, if any.
    root: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.index}@localhost"

    @property
    def amqp_port(self) -> int:
        return self.base_port + self.index

    @property
    def management_port(self) -> int:
        return 10000 + self.base_port + self.index

    @property
    def dist_port(self) -> int:
        return 20000 + self.base_port + self.index

    @property
    def prometheus_port(self) -> int:
        return 10100 + self.base_port + self.index

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

    def seen(self, path: Path) -> str:
        """``path`` (of this machine) as the node sees it: relative to its chroot, if it has one."""
        return seen_from(self.root, path)

    def file(self, name: str) -> str:
        """Where the node reads the file given to ``Cluster(files={name: ...})``."""
        return self.seen(self.base / "files" / name)

    def pid(self) -> int | None:
        try:
            return int((self.directory / "pid").read_text().strip())
        except (OSError, ValueError):
            return None


def seen_from(root: Path | None, path: Path) -> str:
    if root is None:
        return str(path)
    return "/" + str(path.resolve().relative_to(root.resolve()))


def plain_listeners(node: Node) -> str:
    """The default listener lines: AMQP, management over HTTP, Prometheus (when enabled); all on
    the loopback address only."""
    return (
        f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}\n"
        f"management.tcp.ip = 127.0.0.1\n"
        f"management.tcp.port = {node.management_port}\n"
        f"prometheus.tcp.ip = 127.0.0.1\n"
        f"prometheus.tcp.port = {node.prometheus_port}\n"
    )


class Cluster:
    def __init__(
        self,
        base: Path = DEFAULT_DIR,
        size: int = 3,
        *,
        extra_conf: str = "",
        plugins: tuple[str, ...] = (),
        prefix: str = "ebb-n",
        base_port: int | None = None,
        epmd_port: int | None = None,
        root: Path | None = None,
        files: Mapping[str, Path] | None = None,
        listeners: Callable[[Node], str] | None = None,
        statistics_interval_ms: int = 1000,
        advanced_config: str = "",
    ) -> None:
        """``extra_conf``: lines added to every node's rabbitmq.conf; ``plugins``: beyond management;
        ``statistics_interval_ms``: 1000 for tests (consumer counts settle in about a second),
        RabbitMQ's default 5000 for benches that measure what a deployment costs.

        ``base_port``, ``epmd_port`` and ``root`` default to the environment (module docstring);
        ``files``: copied into every start's fresh directory, read by nodes at ``Node.file(name)``;
        ``listeners``: rabbitmq.conf lines replacing ``plain_listeners``; ``advanced_config``:
        every node's advanced.config (Erlang terms), if any.
        """
        self.base = base
        self.root = root if root is not None else env_root()
        self.base_port = base_port if base_port is not None else env_port(BASE_PORT_ENV, BASE_PORT)
        self.epmd_port = epmd_port if epmd_port is not None else env_port(EPMD_PORT_ENV, EPMD_PORT)
        #: Where the nodes' directories, cookie and files live: inside the chroot when there is one.
        self.home = base if self.root is None else self.root / "tmp" / f"ebb-nodes-{_digest(base)}"
        self.nodes = [Node(i, self.home, self.base_port, prefix, self.root) for i in range(1, size + 1)]
        self.extra_conf = extra_conf
        self.plugins = ("rabbitmq_management", *plugins)
        self.files = dict(files or {})
        self.listeners = listeners
        self.statistics_interval_ms = statistics_interval_ms
        self.advanced_config = advanced_config

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    # --- settings for callers and workers ----------------------------------------------------

    def broker_url(self, *order: int) -> str:
        """kombu's failover list (``;``-separated), the nodes in this order."""
        return ";".join(self.node(i).amqp_url for i in order)

    def management_url(self, *order: int) -> str:
        return ";".join(self.node(i).management_url for i in order)

    def ctl_command(self) -> list[str]:
        """``rabbitmqctl`` of these nodes, with their cookie and epmd (add ``-n <node>``)."""
        home = seen_from(self.root, self.home)
        return [
            *self._chroot(),
            "env",
            f"HOME={home}",
            f"ERL_EPMD_PORT={self.epmd_port}",
            f"{BIN}/rabbitmqctl",
        ]

    # --- processes -------------------------------------------------------------------------

    def _chroot(self) -> list[str]:
        return ["chroot", str(self.root)] if self.root is not None else []

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {**os.environ, "HOME": seen_from(self.root, self.home), "ERL_EPMD_PORT": str(self.epmd_port)}
        if node is not None:
            env |= {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_PORT": str(node.amqp_port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": node.seen(node.directory / "mnesia"),
                "RABBITMQ_LOG_BASE": node.seen(node.directory / "log"),
                "RABBITMQ_CONFIG_FILE": node.seen(node.directory / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": node.seen(node.directory / "enabled_plugins"),
                "RABBITMQ_PID_FILE": node.seen(node.directory / "pid"),
                # A node that fails to boot leaves its dump with its logs, not in the caller's cwd.
                "ERL_CRASH_DUMP": node.seen(node.directory / "erl_crash.dump"),
            }
            if self.advanced_config:
                env["RABBITMQ_ADVANCED_CONFIG_FILE"] = node.seen(node.directory / "advanced.config")
        return env

    def ctl(self, index: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node i>`` with the cluster's cookie and epmd; raises when it fails."""
        return subprocess.run(
            [*self._chroot(), f"{BIN}/rabbitmqctl", "-n", self.node(index).name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def _check_root(self) -> None:
        if self.root is None:
            return
        needed = ("proc/self", "dev/null", "etc/hosts", f"{BIN[1:]}/rabbitmq-server")
        missing = [path for path in needed if not (self.root / path).exists()]
        if missing:
            raise RuntimeError(
                f"{ROOT_ENV}={self.root} lacks {', '.join(missing)}: "
                "./dev test mounts /proc and /dev there and copies /etc/hosts"
            )

    def _prepare(self, node: Node) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        listeners = (self.listeners or plain_listeners)(node)
        (node.directory / "rabbitmq.conf").write_text(
            f"{listeners.rstrip()}\n"
            "loopback_users = none\n"
            f"collect_statistics_interval = {self.statistics_interval_ms}\n"
            f"{self.extra_conf}\n"
        )
        (node.directory / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        if self.advanced_config:
            (node.directory / "advanced.config").write_text(self.advanced_config)

    def _launch(self, node: Node) -> None:
        self._prepare(node)
        subprocess.run(
            [*self._chroot(), f"{BIN}/rabbitmq-server", "-detached"],
            env=self._env(node),
            check=True,
            timeout=60,
        )

    def start_node(self, index: int) -> None:
        """Start node i (again) and wait until it runs and its management API answers."""
        self._check_root()
        node = self.node(index)
        self._launch(node)
        self._await(node)

    def _answers(self, node: Node) -> None:
        if self.listeners is None:
            requests.get(
                f"{node.management_url}/api/overview", auth=("guest", "guest"), timeout=5
            ).raise_for_status()
            return
        for port in (node.amqp_port, node.management_port):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    def _await(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.ctl(node.index, "await_startup", "--timeout", "10", timeout=30)
                self._answers(node)
                return
            except (subprocess.SubprocessError, OSError, requests.RequestException) as exc:
                if time.monotonic() > deadline:
                    log = node.directory / "log" / f"{node.name}.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"{node.name} did not start in {START_TIMEOUT:g} s: {exc}\n{tail}"
                    ) from exc
                time.sleep(1)

    def start(self) -> None:
        """Fresh nodes: every node started (in parallel), then 2..n joined to node 1."""
        self._check_root()
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        if self.home != self.base:  # inside the chroot: a link from where the caller looks
            self.base.mkdir(parents=True, exist_ok=True)
            link = self.base / "nodes"
            link.unlink(missing_ok=True)
            link.symlink_to(self.home)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(f"EBBTESTCLUSTER{os.getpid()}")
        cookie.chmod(0o400)
        if self.files:
            (self.home / "files").mkdir()
            for name, source in self.files.items():
                shutil.copy2(source, self.home / "files" / name)
        for node in self.nodes:
            self._launch(node)
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
        subprocess.run(
            [*self._chroot(), f"{BIN}/rabbitmqctl", "-n", node.name, "stop"],
            env=self._env(),
            capture_output=True,
            timeout=120,
        )
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
        """Stop every node, and the private epmd once nobody else's node is registered there."""
        for node in self.nodes:
            if node.pid() is not None:
                self.kill_node(node.index)
        epmd = [*self._chroot(), "epmd"]
        try:
            names = subprocess.run(
                [*epmd, "-names"], env=self._env(), capture_output=True, text=True, timeout=30
            )
            if names.returncode == 0 and "name " not in names.stdout:
                subprocess.run([*epmd, "-kill"], env=self._env(), capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass  # no epmd to end


def _digest(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]


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
    print(f"export EBB_TEST_RABBITMQCTL={shlex.quote(shlex.join(cluster.ctl_command()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
