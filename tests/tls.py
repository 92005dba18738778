"""TLS servers for the tests: a throw-away CA, a TLS-only RabbitMQ node and a TLS-only Redis.

The CA is made with ``openssl`` in a temporary directory; the server certificate names
``localhost`` only (no IP address), so a caller that dials 127.0.0.1 meets a wrong host name.
The RabbitMQ node (a ``tests.cluster`` node of one) listens for AMQPS, management HTTPS and
Prometheus HTTPS only and requires a client certificate; the Redis listens on its TLS port only
and requires one too. Nothing here touches the machine's own broker or Redis.

Ports (the port plan of the suites): AMQPS 5711, management 15711, distribution 25711,
Prometheus 15811, Redis 6391; EBB_TEST_TLS_PORT_OFFSET (10 for the 4.3 suite) moves them all,
the Redis by a tenth of it.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.cluster import Cluster, Node

#: Every TLS port of a suite moves by this (the 4.3 suite: 10).
PORT_OFFSET_ENV = "EBB_TEST_TLS_PORT_OFFSET"
#: The TLS node is node 1 of a ``tests.cluster.Cluster`` on this base: AMQPS 5711 etc.
NODE_BASE_PORT = 5710
REDIS_TLS_PORT = 6391


def port_offset() -> int:
    return int(os.environ.get(PORT_OFFSET_ENV) or "0")


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throw-away CA, a server certificate for ``localhost`` and a client's."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    def env(self, *, client: bool = True) -> dict[str, str]:
        """The EBB_TLS_* settings a caller of the test servers needs (``client``: its certificate)."""
        env = {"EBB_TLS_CA_FILE": str(self.ca)}
        if client:
            env |= {"EBB_TLS_CERT_FILE": str(self.client_cert), "EBB_TLS_KEY_FILE": str(self.client_key)}
        return env

    def client_context(self) -> ssl.SSLContext:
        """What a test's own checks (not the code under test) connect with."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-1000:]}")


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate signed by the CA in ``directory``, valid for a day."""
    (directory / f"{name}.ext").write_text(
        "authorityKeyIdentifier = keyid,issuer\nsubjectKeyIdentifier = hash\n"
        "basicConstraints = critical,CA:FALSE\n"
        "keyUsage = critical,digitalSignature\n" + extensions
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory,
    )  # fmt: skip


def make_certificates(directory: Path) -> Certificates:
    """A new CA and its server (DNS:localhost only) and client certificates in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-sha256", "-subj", "/CN=Ebb test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash", cwd=directory,
    )  # fmt: skip
    server = "subjectAltName = DNS:localhost\nextendedKeyUsage = serverAuth\n"  # no IP address
    _issue(directory, "server", "/CN=localhost", server)
    _issue(directory, "client", "/CN=ebb-test-client", "extendedKeyUsage = clientAuth\n")
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return Certificates(directory)


class TlsRedis:
    """``redis-server`` with its TLS port only (``--port 0``), client certificates required."""

    def __init__(self, certs: Certificates, directory: Path, port: int | None = None) -> None:
        self.certs = certs
        self.directory = directory
        self.port = port if port is not None else REDIS_TLS_PORT + port_offset() // 10
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0"

    def start(self) -> None:
        """Start it and return once it answers PING over TLS; raises RuntimeError when it does not."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        command = [
            "redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(self.certs.server_cert),
            "--tls-key-file", str(self.certs.server_key),
            "--tls-ca-cert-file", str(self.certs.ca),
            "--tls-auth-clients", "yes",
            "--save", "", "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(log),
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().ping()
                return
            except redis.RedisError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"TLS Redis on port {self.port} did not start: {exc}\n{tail}") from exc
                time.sleep(0.2)

    def client(self) -> redis.Redis:
        """A client of the test's own (not the code under test's) with the test CA and certificate."""
        return redis.Redis(
            host="localhost",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.certs.ca),
            ssl_certfile=str(self.certs.client_cert),
            ssl_keyfile=str(self.certs.client_key),
            socket_timeout=3,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _tls_options(prefix: str, node: Node) -> list[str]:
    """A listener's certificates, and the client certificate it requires (mutual TLS)."""
    return [
        f"{prefix}.cacertfile = {node.file('ca.pem')}",
        f"{prefix}.certfile = {node.file('server.pem')}",
        f"{prefix}.keyfile = {node.file('server.key')}",
        f"{prefix}.verify = verify_peer",
        f"{prefix}.fail_if_no_peer_cert = true",
    ]


def _prometheus_knows(node: Node, key: str) -> bool:
    """Whether the node's rabbitmq_prometheus (its own version's schema) has this setting."""
    schemas = (node.root or Path("/")).glob(
        "usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbitmq_prometheus-*/priv/schema/*.schema"
    )
    return any(f'"{key}"' in schema.read_text(errors="replace") for schema in schemas)


def tls_listeners(node: Node) -> str:
    """rabbitmq.conf listener lines: AMQPS, management and Prometheus over HTTPS; nothing plain.

    RabbitMQ 4's Prometheus plugin also opens plain HTTP on 15692 unless told not to; 3.10's
    has no such setting (and refuses unknown ones), nor that default listener beside TLS.
    """
    plain_prometheus = "prometheus.tcp.listener"
    return "\n".join(
        [
            "listeners.tcp = none",
            *([f"{plain_prometheus} = none"] if _prometheus_knows(node, plain_prometheus) else []),
            f"listeners.ssl.local = 127.0.0.1:{node.amqp_port}",
            *_tls_options("ssl_options", node),
            "management.ssl.ip = 127.0.0.1",
            f"management.ssl.port = {node.management_port}",
            *_tls_options("management.ssl", node),
            "prometheus.ssl.ip = 127.0.0.1",
            f"prometheus.ssl.port = {node.prometheus_port}",
            *_tls_options("prometheus.ssl", node),
        ]
    )


class TlsNode:
    """One RabbitMQ node (the suite's rabbitmq-server: the machine's or EBB_TEST_RABBITMQ_ROOT's)
    with TLS-only listeners and client certificates required on each.

    Its management statistics are off, so the audit reads consumer counts from Prometheus:
    both of the audit's HTTPS links are used.
    """

    def __init__(self, certs: Certificates, base: Path) -> None:
        self.certs = certs
        self.cluster = Cluster(
            base,
            size=1,
            prefix="ebb-tls",
            base_port=NODE_BASE_PORT + port_offset(),
            plugins=("rabbitmq_prometheus",),
            files={"ca.pem": certs.ca, "server.pem": certs.server_cert, "server.key": certs.server_key},
            listeners=tls_listeners,
            extra_conf="management_agent.disable_metrics_collector = true",
        )
        self.node = self.cluster.node(1)

    @property
    def amqps_port(self) -> int:
        return self.node.amqp_port

    def broker_url(self, host: str = "localhost", port: int | None = None) -> str:
        return f"amqps://guest:guest@{host}:{port or self.amqps_port}//"

    @property
    def management_url(self) -> str:
        return f"https://localhost:{self.node.management_port}"

    @property
    def prometheus_url(self) -> str:
        return f"https://localhost:{self.node.prometheus_port}"

    def start(self) -> None:
        """Start it; raises (RuntimeError, OSError, CalledProcessError) when it does not come up."""
        self.cluster.start()

    def stop(self) -> None:
        self.cluster.stop()
