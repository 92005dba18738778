"""CPU time per process group, read from /proc, so a benchmark can say where a job's cost goes.

RabbitMQ is the bottleneck here: wall-clock throughput alone hides whether a change saved the
broker work or just moved it. Groups are found by listening port (the broker and the Redis a
bench talks to: two brokers may run on one machine), by session (a worker started with
``start_new_session`` and its pool) or by pid (the client). :func:`target` names the broker
and Redis of ``Settings`` (version, node, URL without password) for every bench's report.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from ebb.config import Settings

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its closing one.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (fields 14 and 15 of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (any address, IPv4 or IPv6) in this network namespace."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... uid timeout inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def listening_pid(port: int) -> int | None:
    """The process that listens on ``port`` here: the one holding that socket among its fds."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not sockets:
        return None
    for pid in _all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                    return pid
            except OSError:
                continue
    return None


def by_port(port: int | None) -> Callable[[], list[int]]:
    """The process listening on ``port`` (none for ``None``): looked up anew at each start."""

    def find() -> list[int]:
        pid = None if port is None else listening_pid(port)
        return [] if pid is None else [pid]

    return find


def by_session(session: Callable[[], int | None]) -> Callable[[], list[int]]:
    """Every process of a session (a worker started with ``start_new_session`` and its pool)."""

    def find() -> list[int]:
        sid = session()
        if sid is None:
            return []
        found = []
        for pid in _all_pids():
            fields = _stat(pid)
            if fields is not None and int(fields[3]) == sid:
                found.append(pid)
        return found

    return find


class CpuMeter:
    """``start()`` then ``per_job(n)``: CPU milliseconds per job of each group in between."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._pids: dict[str, list[int]] = {}
        self._start: dict[str, float] = {}

    def start(self) -> None:
        # The same processes are read at both ends: one that starts in between is not counted.
        self._pids = {name: find() for name, find in self.groups.items()}
        self._start = {name: cpu_seconds(pids) for name, pids in self._pids.items()}

    def per_job(self, jobs: int) -> dict[str, float]:
        used = {name: cpu_seconds(pids) - self._start[name] for name, pids in self._pids.items()}
        return {name: round(seconds * 1000 / jobs, 2) for name, seconds in used.items()}


# --- which broker and Redis a bench measures ---------------------------------------------------

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379, "http": 80, "https": 443}


def safe_url(url: str) -> str:
    """``url`` without its password, for reports."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def first_url(urls: str) -> str:
    """The first URL of a ``;`` failover list (EBB_BROKER_URL, EBB_MANAGEMENT_URL): the one a bench uses."""
    return urls.split(";")[0].strip()


def local_port(url: str) -> int | None:
    """The TCP port of ``url`` if it is served on this machine (else its processes are not ours to read)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return None
    local = address.startswith("127.") or host in {socket.gethostname(), socket.getfqdn()}
    if not local or parts.scheme not in DEFAULT_PORTS:
        return None
    return parts.port or DEFAULT_PORTS[parts.scheme]


@dataclass(frozen=True)
class Target:
    """The RabbitMQ node and the Redis a bench talks to, as its report names them."""

    broker_url: str  # password hidden
    management_url: str  # the first of EBB_MANAGEMENT_URL's list: where the bench's API calls go
    version: str
    node: str  # the node serving the AMQP port (from the management API's listeners)
    amqp_port: int | None  # None: not on this machine, so no CPU figures for it
    redis_url: str
    redis_port: int | None

    @property
    def rabbitmq(self) -> Callable[[], list[int]]:
        return by_port(self.amqp_port)

    @property
    def redis(self) -> Callable[[], list[int]]:
        return by_port(self.redis_port)

    def describe(self) -> str:
        beam, redis = self.rabbitmq(), self.redis()
        return (
            f"RabbitMQ {self.version}, node {self.node}, {self.broker_url} "
            f"(beam.smp pid {beam[0] if beam else 'not on this machine: no CPU figures'}, "
            f"management {self.management_url}); Redis {self.redis_url} "
            f"(pid {redis[0] if redis else 'not on this machine'})"
        )

    def to_dict(self) -> dict[str, Any]:
        beam, redis = self.rabbitmq(), self.redis()
        return {
            "broker_url": self.broker_url,
            "management_url": self.management_url,
            "rabbitmq_version": self.version,
            "node": self.node,
            "beam_pid": beam[0] if beam else None,
            "redis_url": self.redis_url,
            "redis_pid": redis[0] if redis else None,
        }


def target(settings: Settings) -> Target:
    """Find the broker of ``settings`` (EBB_BROKER_URL), check the management API speaks for it.

    A management URL left at another broker's default would give memory and queue figures of the
    wrong node while the CPU is read off the right one: refused here, before anything is measured.
    """
    broker_url = first_url(settings.broker_url)
    management_url = first_url(settings.management_url).rstrip("/")
    response = requests.get(
        f"{management_url}/api/overview",
        auth=(settings.management_user, settings.management_password),
        timeout=30,
    )
    response.raise_for_status()
    overview = response.json()
    amqp_port = local_port(broker_url)
    parts = urlsplit(broker_url)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 5672)
    nodes = sorted(
        {
            str(listener["node"])
            for listener in overview.get("listeners", [])
            if str(listener.get("protocol", "")).startswith("amqp") and int(listener.get("port", 0)) == port
        }
    )
    node = str(overview.get("node", "?"))
    # With the management statistics off the overview lists no listeners: the pid check below
    # (one process serves both ports) is then what ties the two URLs to one node.
    if "listeners" in overview and node not in nodes:
        raise SystemExit(
            f"EBB_MANAGEMENT_URL {management_url} is node {node}, which has no AMQP listener on port "
            f"{port} of EBB_BROKER_URL {safe_url(broker_url)} (listeners there: {nodes or 'none'}): "
            "point both at the same broker"
        )
    management_port = local_port(management_url)
    if amqp_port is not None and management_port is not None:
        amqp_pid, management_pid = listening_pid(amqp_port), listening_pid(management_port)
        if amqp_pid != management_pid:
            raise SystemExit(
                f"port {amqp_port} (EBB_BROKER_URL) is served by pid {amqp_pid}, port {management_port} "
                f"(EBB_MANAGEMENT_URL) by pid {management_pid}: point both at the same broker"
            )
    return Target(
        broker_url=safe_url(broker_url),
        management_url=management_url,
        version=str(overview.get("rabbitmq_version", "?")),
        node=node,
        amqp_port=amqp_port,
        redis_url=safe_url(settings.redis_url),
        redis_port=local_port(settings.redis_url),
    )
