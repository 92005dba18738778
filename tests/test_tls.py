"""TLS on every link, against real TLS-only servers (tests/tls.py): a RabbitMQ node with AMQPS,
management and Prometheus over HTTPS only, and a Redis with its TLS port only, both requiring a
client certificate, all signed by a throw-away CA whose server certificate names ``localhost`` only.

Jobs run end to end with both clients and a worker, the audit (by hand, from beat, and ``ebb
audit``) and the ``ebb`` command work over it, and every way TLS can fail is an Ebb error that
says TLS and why, within the connect bound, never a silent plain-text fallback.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from ebb import BrokerUnavailableError, EbbError, Job, JobClient, RegistryUnavailableError
from ebb.config import Settings
from ebb.errors import ConfigurationError
from tasks.audit import Auditor
from tests.conftest import AnyClient
from tests.support import ROOT, amqp_endpoint, redis_endpoint, start_worker, stop_worker, wait_until
from tests.tls import Certificates, TlsNode, TlsRedis, make_certificates

#: EBB_BROKER_TIMEOUT in this module: every failed connect must end within it (plus MARGIN).
BOUND = 5.0
MARGIN = 3.0
EBB = os.path.join(ROOT, ".venv", "bin", "ebb")
#: Set to the system's bundle in many CI images (and on this machine): ``requests`` prefers them
#: to a Session's own ``verify``, so every test runs with them set and EBB_TLS_CA_FILE must win.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def system_bundle() -> str:
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.openssl_cafile


@dataclass(frozen=True)
class TlsServers:
    certs: Certificates
    node: TlsNode
    redis: TlsRedis

    def env(
        self, overrides: Mapping[str, str] | None = None, *, ca: bool = True, client_cert: bool = True
    ) -> dict[str, str]:
        """The process environment of a caller of these servers: ``ca``/``client_cert`` off leave
        out EBB_TLS_CA_FILE / EBB_TLS_CERT_FILE and EBB_TLS_KEY_FILE."""
        env = {name: value for name, value in os.environ.items() if not name.startswith("EBB_TLS_")}
        env |= {
            "EBB_BROKER_URL": self.node.broker_url(),
            "EBB_MANAGEMENT_URL": self.node.management_url,
            "EBB_PROMETHEUS_URL": self.node.prometheus_url,
            "EBB_REDIS_URL": self.redis.url,
            "EBB_BROKER_TIMEOUT": str(BOUND),
            **self.certs.env(client=client_cert),
            **dict.fromkeys(CA_BUNDLE_VARIABLES, system_bundle()),
        }
        if not ca:
            del env["EBB_TLS_CA_FILE"]
        return env | dict(overrides or {})

    def settings(
        self, overrides: Mapping[str, str] | None = None, *, ca: bool = True, client_cert: bool = True
    ) -> Settings:
        return Settings.from_env(self.env(overrides, ca=ca, client_cert=client_cert))

    def queues_of(self, job_id: uuid.UUID) -> list[str]:
        """The job's queues the node still holds (the management API over HTTPS, as a test's own check)."""
        answer = requests.get(
            f"{self.node.management_url}/api/queues/%2F",
            params={"columns": "name"},
            auth=("guest", "guest"),
            verify=str(self.certs.ca),
            cert=(str(self.certs.client_cert), str(self.certs.client_key)),
            timeout=10,
        )
        answer.raise_for_status()
        return [q["name"] for q in answer.json() if str(job_id) in q["name"]]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServers]:
    base = tmp_path_factory.mktemp("tls")
    try:
        certs = make_certificates(base / "certs")
    except (OSError, RuntimeError) as exc:
        pytest.fail(f"the test CA could not be made with openssl: {exc}")
    servers = TlsServers(certs, TlsNode(certs, base / "rabbitmq"), TlsRedis(certs, base / "redis"))
    try:
        servers.redis.start()
        servers.node.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # fails the module, never skips
        servers.node.stop()
        servers.redis.stop()
        pytest.fail(f"the TLS servers did not start: {exc}")
    yield servers
    servers.node.stop()
    servers.redis.stop()


@pytest.fixture(scope="module")
def tls_worker(tls: TlsServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``celery -A tasks worker`` configured by the environment alone, over TLS."""
    log = tmp_path_factory.mktemp("tls-worker") / "worker.log"
    try:
        proc = start_worker(log, env=tls.env())
    except RuntimeError as exc:
        pytest.fail(f"the worker did not start over TLS: {exc}")
    yield log
    stop_worker(proc)


def dead_port() -> int:
    """A port nothing listens on (the kernel's pick, released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect_fails(make_client: Callable[..., AnyClient], settings: Settings) -> EbbError:
    """The error of a client that cannot connect, which must come within the connect bound."""
    started = time.monotonic()
    with pytest.raises(EbbError) as caught:
        make_client(settings=settings).close()
    elapsed = time.monotonic() - started
    assert elapsed < BOUND + MARGIN, f"took {elapsed:.1f}s, the bound is {BOUND}s: {caught.value}"
    return caught.value


def run_a_job(client: AnyClient) -> None:
    job = client.submit_job("demo.echo", {"over": "tls"}, auto_cleanup_after_ttl=30)
    result = client.wait(job, timeout=30)
    assert result.succeeded and result.output == {"over": "tls"}


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["EBB_TLS_CA_FILE", "EBB_TLS_CERT_FILE", "EBB_TLS_KEY_FILE"])
def test_a_missing_tls_file_is_a_configuration_error_naming_its_variable(
    variable: str, tmp_path: Path
) -> None:
    present = tmp_path / "present.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {
        "EBB_TLS_CA_FILE": str(present),
        "EBB_TLS_CERT_FILE": str(present),
        "EBB_TLS_KEY_FILE": str(present),
    }
    env[variable] = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match=variable):
        Settings.from_env(env)


# --- jobs over TLS -----------------------------------------------------------------------------


def test_a_job_runs_end_to_end_over_tls(
    tls: TlsServers, tls_worker: Path, make_client: Callable[..., AnyClient]
) -> None:
    statuses: list[str] = []
    progress: list[float] = []
    with make_client(settings=tls.settings()) as client:
        job = client.submit_job(
            "demo.sleep",
            {"seconds": 0.4, "steps": 2},
            on_status=lambda j, update: statuses.append(update.status.value),
            on_progress=lambda j, update: progress.append(update.progress),
            auto_cleanup_after_ttl=60,
        )
        result = client.wait(job, timeout=30)
        assert result.succeeded and result.output == {"slept": 0.4}
        assert client.job_status(job).status == "SUCCEEDED"  # the registry, over rediss://
    assert "RUNNING" in statuses and progress == [0.5, 1.0]
    assert wait_until(lambda: not tls.queues_of(job.id), 10), tls.queues_of(job.id)


def test_a_failover_list_of_amqps_brokers_reaches_the_live_node(
    tls: TlsServers, tls_worker: Path, make_client: Callable[..., AnyClient]
) -> None:
    # The first broker named 127.0.0.1 and down: the certificate is checked against the name of
    # the broker actually used (localhost), not the first one of the list.
    urls = f"{tls.node.broker_url('127.0.0.1', dead_port())};{tls.node.broker_url()}"
    with make_client(settings=tls.settings({"EBB_BROKER_URL": urls})) as client:
        run_a_job(client)


def test_a_failover_list_checks_the_host_name_of_the_node_actually_used(
    tls: TlsServers, make_client: Callable[..., AnyClient]
) -> None:
    urls = f"{tls.node.broker_url('localhost', dead_port())};{tls.node.broker_url('127.0.0.1')}"
    error = connect_fails(make_client, tls.settings({"EBB_BROKER_URL": urls}))
    assert isinstance(error, BrokerUnavailableError)
    assert "TLS" in str(error) and "does not match the host name" in str(error)
    assert f"127.0.0.1:{tls.node.amqps_port}" in str(error), "the error must name the node that failed"


# --- no silent fallback: each TLS failure says why ---------------------------------------------

BROKER_FAILURES = {
    "plain listener": "did not answer TLS",
    "unknown CA": "certificate is not trusted",
    "wrong host name": "does not match the host name",
    "no client certificate": "TLS",
}


@pytest.mark.parametrize("failure", list(BROKER_FAILURES))
def test_a_broker_tls_failure_says_why_within_the_bound(
    failure: str, tls: TlsServers, settings: Settings, make_client: Callable[..., AnyClient]
) -> None:
    plain_host, plain_port = amqp_endpoint(settings)  # the suite's broker: a plain AMQP listener
    tls_settings = {
        "plain listener": lambda: tls.settings(
            {"EBB_BROKER_URL": tls.node.broker_url(plain_host, plain_port)}
        ),
        "unknown CA": lambda: tls.settings(ca=False),
        "wrong host name": lambda: tls.settings({"EBB_BROKER_URL": tls.node.broker_url("127.0.0.1")}),
        "no client certificate": lambda: tls.settings(client_cert=False),
    }[failure]()
    error = connect_fails(make_client, tls_settings)
    if failure != "no client certificate":
        assert isinstance(error, BrokerUnavailableError)
    assert "TLS" in str(error) and BROKER_FAILURES[failure] in str(error), str(error)


REDIS_FAILURES: dict[str, str | None] = {
    "rediss to a plain Redis": "did not answer TLS",
    "redis to the TLS port": None,  # a plain URL: the error need not speak of TLS
    "unknown CA": "certificate is not trusted",
    "wrong host name": "does not match the host name",
    "no client certificate": "TLS",
}


@pytest.mark.parametrize("failure", list(REDIS_FAILURES))
def test_a_redis_tls_failure_says_why_within_the_bound(
    failure: str, tls: TlsServers, settings: Settings, make_client: Callable[..., AnyClient]
) -> None:
    plain_host, plain_port = redis_endpoint(settings)  # the suite's Redis: plain text
    tls_port = tls.redis.port
    overrides, ca, client_cert = {
        "rediss to a plain Redis": ({"EBB_REDIS_URL": f"rediss://{plain_host}:{plain_port}/0"}, True, True),
        "redis to the TLS port": ({"EBB_REDIS_URL": f"redis://localhost:{tls_port}/0"}, True, True),
        "unknown CA": ({}, False, True),
        "wrong host name": ({"EBB_REDIS_URL": f"rediss://127.0.0.1:{tls_port}/0"}, True, True),
        "no client certificate": ({}, True, False),
    }[failure]
    # The suite's plain broker, so that only the registry link is wrong.
    broken = tls.settings(
        {"EBB_BROKER_URL": settings.broker_url, **overrides}, ca=ca, client_cert=client_cert
    )
    with make_client(settings=broken) as client:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError) as caught:
            client.job_status(uuid.uuid4())
        elapsed = time.monotonic() - started
    assert elapsed < BOUND + MARGIN, f"took {elapsed:.1f}s, the bound is {BOUND}s: {caught.value}"
    words = REDIS_FAILURES[failure]
    if words is not None:
        assert "TLS" in str(caught.value) and words in str(caught.value), str(caught.value)


# --- the audit and the command line over TLS ---------------------------------------------------


def orphan_lines(text: str, event: str, job_id: uuid.UUID) -> list[str]:
    return [line for line in text.splitlines() if f"event={event}" in line and str(job_id) in line]


def test_the_audit_over_https_finds_and_removes_an_orphan(
    tls: TlsServers, tls_worker: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in CA_BUNDLE_VARIABLES:
        monkeypatch.setenv(variable, system_bundle())
    settings = tls.settings()
    with JobClient(settings=settings) as caller:  # closed at once: its queues are left unused
        job = caller.submit_job(
            "demo.sleep", {"seconds": 0.2, "steps": 1}, on_status=lambda j, s: None, auto_cleanup_after_ttl=6
        )
    auditor = Auditor(settings)
    auditor.confirm_after = 2.0
    reports = []
    with caplog.at_level(logging.INFO, "ebb.audit"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(orphan_lines(caplog.text, "orphan_removed", job.id)) < 2:
            reports.append(auditor.run())
            time.sleep(1)
    assert all(r.registry_available for r in reports), "the audit could not read the registry over TLS"
    assert {r.consumers_from for r in reports} == {"prometheus"}  # the node has no management stats
    found = orphan_lines(caplog.text, "orphan_found", job.id)
    removed = orphan_lines(caplog.text, "orphan_removed", job.id)
    assert len(found) == 2 and len(removed) == 2, caplog.text  # its result and status queues
    assert any(".result" in line and 'lost="result never delivered"' in line for line in removed)
    assert not tls.queues_of(job.id)
    with JobClient(settings=settings) as client:
        assert client.job_status(job).lost == "result never delivered"


def test_beat_audits_over_tls(tls: TlsServers, tls_worker: Path, tmp_path: Path) -> None:
    """Beat publishes the audit over amqps://; the worker runs it over https:// and rediss://."""
    log = tmp_path / "beat.log"
    env = tls.env({"EBB_AUDIT_INTERVAL": "1", "EBB_TASK_QUEUE": f"{os.environ['EBB_TASK_QUEUE']}.beat"})
    beat = start_worker(log, "-B", "-s", str(tmp_path / "beat-schedule"), env=env)
    try:
        assert wait_until(lambda: log.read_text().count("event=audit_summary") >= 2, 30), log.read_text()[
            -3000:
        ]
    finally:
        stop_worker(beat)
    summaries = [line for line in log.read_text().splitlines() if "event=audit_summary" in line]
    assert all("registry=ok" in line and "consumers_from=prometheus" in line for line in summaries), summaries


def ebb(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EBB, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_the_ebb_command_over_tls(tls: TlsServers, tls_worker: Path) -> None:
    env = tls.env()
    submitted = ebb(
        "submit", "demo.sleep", "-p", "seconds=.2", "-p", "steps=1", "--ttl", "1m", "--json", env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    events = json_lines(submitted.stdout)
    assert events[-1]["status"] == "SUCCEEDED", events
    job_id = events[0]["job_id"]
    status = ebb("status", job_id, "--json", env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED", status.stderr
    workflows = ebb("workflows", "--json", env=env)
    assert workflows.returncode == 0, workflows.stderr
    assert {"demo.sleep", "demo.echo"} <= {w["name"] for w in json.loads(workflows.stdout)}
    audit = ebb("audit", "--json", env=env)
    assert audit.returncode == 0, audit.stderr
    report = json.loads(audit.stdout)
    assert report["registry_available"] and report["consumers_from"] == "prometheus"
    # Without the CA the command says TLS and why, and exits as for an unreachable broker.
    untrusted = ebb("status", job_id, env=tls.env(ca=False))
    assert untrusted.returncode == 4 and "certificate is not trusted" in untrusted.stderr, untrusted.stderr


def test_a_job_submitted_over_tls_can_be_followed_from_its_json(
    tls: TlsServers, tls_worker: Path, make_client: Callable[..., AnyClient]
) -> None:
    """A caller that reconnects (another process, say) does so over TLS too."""
    settings = tls.settings()
    with JobClient(settings=settings) as first:
        job = first.submit_job("demo.sleep", {"seconds": 0.5, "steps": 1}, auto_cleanup_after_ttl=60)
    with make_client(settings=settings) as second:
        second.connect_to_submitted_job(Job.from_json(job.to_json()), on_finished=lambda j, r: None)
        assert second.wait(job, timeout=30).succeeded
