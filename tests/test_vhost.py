"""Ebb in a vhost of its own, set up by deploy/: jobs, a worker, the audit and the expiry policy.

The vhost is the one EBB_BROKER_URL names (percent-encoded in its path: ``ebb/test vhost …``).
deploy/rabbitmq-users.sh creates it and the three users, with passwords full of quotes,
backslashes, spaces and dollars, and deploy/rabbitmq-policy.sh puts the expiry safety net on
it. Every command the scripts run is recorded, to prove no password was on a command line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import requests
from kombu.connection import Connection

from ebb import JobClient, JobStatus
from ebb.config import Settings
from ebb.contract import QueueKind, job_queue, queue_name
from tasks.audit import Auditor, QueueFinding
from tasks.expiry_policy import POLICY_NAME
from tests.conftest import AnyClient
from tests.support import ROOT, Management, broker_url_as, start_worker, stop_worker
from tests.test_audit import audit_lines

USERS_SCRIPT = Path(ROOT, "deploy", "rabbitmq-users.sh")
POLICY_SCRIPT = Path(ROOT, "deploy", "rabbitmq-policy.sh")
#: Every program the deploy scripts may run: a recording wrapper of each is all they find on PATH.
RECORDED = ("curl", "python3", "dirname", "basename", "awk")
#: The vhost's expiry policy: short, so a test sees it remove queues (a deployment uses EBB_MAX_TTL).
POLICY_EXPIRES_S = 8
ROLES = ("caller", "worker", "monitor")


@dataclasses.dataclass(frozen=True)
class Deployment:
    vhost: str
    users: dict[str, str]
    passwords: dict[str, str]
    #: Everything the scripts ran, one command line per line.
    commands: str
    #: The task queue the vhost's worker reads (a name no worker reads in "/").
    task_queue: str
    admin: Settings
    #: What deploy/rabbitmq-users.sh was given, to run it again.
    users_env: dict[str, str]

    def as_role(self, role: str, base: Settings) -> Settings:
        """``base`` for the vhost, logged in as ``role``'s user (the monitor: the management API)."""
        url = broker_url_as(base, self.users[role], self.passwords[role], vhost=self.vhost)
        settings = dataclasses.replace(base, broker_url=url, task_queue=self.task_queue)
        if role == "monitor":
            return dataclasses.replace(
                settings, management_user=self.users[role], management_password=self.passwords[role]
            )
        return settings


def recording_path(directory: Path, log: Path) -> str:
    """A PATH of wrappers that append their command line to ``log``, then run the real program."""
    directory.mkdir()
    for name in RECORDED:
        real = sys.executable if name == "python3" else shutil.which(name)
        assert real, f"{name} is needed by the deploy scripts"
        wrapper = directory / name
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{log}"\nexec "{real}" "$@"\n')
        wrapper.chmod(0o755)
    return str(directory)


def run_script(script: Path, settings: Settings, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A deploy script as an operator runs it: its settings in the environment, nothing else."""
    tls = {k: v for k, v in os.environ.items() if k == "EBB_TLS_CA_FILE"}
    return subprocess.run(
        ["/bin/sh", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": path,
            "RABBITMQ_URL": settings.management_url,
            "RABBITMQ_ADMIN_USER": settings.management_user,
            "RABBITMQ_ADMIN_PASSWORD": settings.management_password,
            **tls,
            **env,
        },
    )


def api(settings: Settings, method: str, path: str) -> requests.Response:
    return requests.request(
        method,
        f"{settings.management_url}/api/{path}",
        auth=(settings.management_user, settings.management_password),
        timeout=10,
    )


@pytest.fixture(scope="module")
def deployment(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The vhost, its users and its expiry policy, all from the deploy scripts, and a worker there."""
    tag = uuid.uuid4().hex[:8]
    vhost = f"ebb/test vhost {tag}"
    users = {role: f"ebb-{role}-{tag}" for role in ROLES}
    # Each would break the JSON the scripts used to paste together, or a shell that expanded it.
    passwords = {
        "caller": f'c"a\\l\'l $HOME e\\"r{tag}',
        "worker": f"w' $(id) \\\\ \"o`true`{tag}",
        "monitor": f'm","tags":"administrator" \\ \'$USER\' {tag}',
    }
    home = tmp_path_factory.mktemp("vhost")
    log = home / "commands.log"
    path = recording_path(home / "bin", log)
    environment = {
        f"EBB_{role.upper()}_{kind}": value
        for role in ROLES
        for kind, value in (
            ("USER", users[role]),
            ("PASSWORD", passwords[role]),
        )
    }
    environment["RABBITMQ_VHOST"] = vhost
    created = run_script(USERS_SCRIPT, settings, path, **environment)
    admin = dataclasses.replace(settings, broker_url=broker_url_as(settings, vhost=vhost))
    try:
        assert created.returncode == 0, created.stderr
        policy = run_script(
            POLICY_SCRIPT, settings, path, RABBITMQ_VHOST=vhost, EBB_MAX_TTL=str(POLICY_EXPIRES_S)
        )
        assert policy.returncode == 0, policy.stderr
        here = Deployment(
            vhost, users, passwords, log.read_text(), f"{settings.task_queue}.vhost.{tag}", admin, environment
        )
        worker_log = home / "worker.log"
        worker_settings, monitor = here.as_role("worker", settings), here.as_role("monitor", settings)
        proc = start_worker(
            worker_log,
            env={
                "EBB_BROKER_URL": worker_settings.broker_url,
                "EBB_TASK_QUEUE": here.task_queue,
                "EBB_MANAGEMENT_USER": monitor.management_user,
                "EBB_MANAGEMENT_PASSWORD": monitor.management_password,
            },
        )
        try:
            yield here
        finally:
            stop_worker(proc)
    finally:
        api(settings, "DELETE", f"vhosts/{quote(vhost, safe='')}")
        for name in users.values():
            api(settings, "DELETE", f"users/{quote(name, safe='')}")
        memory = redis.Redis.from_url(settings.redis_url, socket_timeout=3)
        stale = list(memory.scan_iter(match=f"ebb:audit:{vhost}:*"))
        if stale:
            memory.delete(*stale)


def test_the_scripts_put_no_password_on_a_command_line(deployment: Deployment, settings: Settings) -> None:
    commands = deployment.commands.splitlines()
    assert sum(line.startswith("curl ") for line in commands) >= 8, commands  # vhost, users, rights, policy
    for secret in [settings.management_password, *deployment.passwords.values()]:
        leaked = [line for line in commands if secret in line]
        assert not leaked, f"a password reached a command line: {leaked}"


def test_a_quote_in_a_password_adds_no_field_and_each_role_gets_its_rights(
    deployment: Deployment, settings: Settings
) -> None:
    again = run_script(USERS_SCRIPT, settings, os.environ["PATH"], **deployment.users_env)
    assert again.returncode == 0, again.stderr  # idempotent: every deploy runs it
    tags = {
        role: api(settings, "GET", f"users/{name}").json()["tags"] for role, name in deployment.users.items()
    }
    assert tags == {"caller": [], "worker": [], "monitor": ["monitoring"]}
    vhost = quote(deployment.vhost, safe="")
    rights = {
        role: {
            k: api(settings, "GET", f"permissions/{vhost}/{name}").json()[k]
            for k in ("configure", "write", "read")
        }
        for role, name in deployment.users.items()
    }
    assert rights == {
        "caller": {
            "configure": r"^jobs\..+$",
            "write": r"^amq\.default$",
            "read": r"^jobs\..+$",
        },
        "worker": {"configure": r"^(?!jobs\.).*", "write": ".*", "read": r"^(?!jobs\.).*"},
        "monitor": {"configure": r"^jobs\..+$", "write": "", "read": r"^jobs\..+$"},
    }
    monitor = deployment.as_role("monitor", settings)
    whoami = api(monitor, "GET", "whoami")
    assert whoami.status_code == 200 and whoami.json()["name"] == deployment.users["monitor"]
    for role in ("caller", "worker"):  # each password logs in, to the vhost, as written
        with Connection(deployment.as_role(role, settings).broker_url, connect_timeout=10) as connection:
            connection.connect()


def test_a_job_runs_in_its_vhost_for_both_clients(
    deployment: Deployment, settings: Settings, make_client: Callable[..., AnyClient]
) -> None:
    progress: list[float] = []
    with make_client(settings=deployment.as_role("caller", settings)) as client:
        assert "demo.sleep" in {w.name for w in client.list_workflows()}
        job = client.submit_job(
            "demo.sleep", {"seconds": 0.4, "steps": 2}, on_progress=lambda j, p: progress.append(p.progress)
        )
        result = client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED, result
    assert progress == pytest.approx([0.5, 1.0])
    assert not Management(deployment.admin).job_queues(job.id), "the caller cleaned up in its vhost"


def test_a_worker_advertises_its_workflows_in_its_vhost_only(
    deployment: Deployment, settings: Settings
) -> None:
    """Same Redis, same task queue name: a caller of "/" does not count the vhost's worker."""
    there = deployment.as_role("caller", settings)
    with JobClient(settings=there) as client:
        assert "demo.sleep" in {w.name for w in client.list_workflows()}
    with JobClient(settings=dataclasses.replace(settings, task_queue=deployment.task_queue)) as client:
        assert client.list_workflows() == []


def test_the_policy_expires_an_abandoned_jobs_queues_and_the_audit_there_reports_them(
    deployment: Deployment, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = queue_name(uuid.uuid4(), QueueKind.RESULT)  # a job queue of "/", never to be seen
    with Connection(settings.broker_url) as connection:
        job_queue(uuid.UUID(elsewhere.split(".")[1]), QueueKind.RESULT, timedelta(minutes=2)).queue_declare(
            channel=connection.default_channel
        )
    caller = deployment.as_role("caller", settings)
    with JobClient(settings=caller) as client:  # its queues expire 48 h after last use, on their own
        job = client.submit_job(
            "demo.sleep",
            {"seconds": 1, "steps": 2},
            on_progress=lambda j, p: None,
            on_status=lambda j, s: None,
        )
        client.disconnect_from_submitted_job(job)
    abandoned = time.monotonic()
    queues = {queue_name(job.id, kind) for kind in QueueKind}
    auditor = Auditor(deployment.as_role("monitor", settings))
    seen: dict[str, QueueFinding] = {}
    seen_elsewhere = False
    gone_after = None
    with caplog.at_level(logging.INFO, "ebb.audit"):
        while time.monotonic() - abandoned < 40:
            report = auditor.run()
            found = {f.queue: f for f in report.findings}
            seen_elsewhere |= elsewhere in found
            seen.update((name, f) for name, f in found.items() if name in queues)
            if gone_after is None and seen and not queues & found.keys():
                gone_after = time.monotonic() - abandoned
            if len(audit_lines(caplog.text, "orphan_removed", job.id)) == 3:
                break
            time.sleep(1)
    assert not seen_elsewhere, "the audit of the vhost saw a queue of /"
    assert set(seen) == queues
    assert {(f.operator_policy, f.expires_s) for f in seen.values()} == {(POLICY_NAME, POLICY_EXPIRES_S)}
    assert gone_after is not None and POLICY_EXPIRES_S - 2 <= gone_after <= POLICY_EXPIRES_S + 15, gone_after
    for event in ("orphan_found", "orphan_removed"):
        reported = sorted(
            line.split("queue=")[1].split()[0] for line in audit_lines(caplog.text, event, job.id)
        )
        assert reported == sorted(queues), (event, caplog.text[-3000:])
    assert Management(settings).queue(elsewhere) is not None, "the vhost's policy reached /"
    with Connection(settings.broker_url) as connection:
        connection.default_channel.queue_delete(elsewhere)


def test_the_users_script_fails_clearly_when_the_admin_is_refused(settings: Settings) -> None:
    wrong = f'no"pe \\ {uuid.uuid4().hex}'
    refused = run_script(
        USERS_SCRIPT,
        dataclasses.replace(settings, management_password=wrong),
        os.environ["PATH"],
        EBB_CALLER_PASSWORD="a",
        EBB_WORKER_PASSWORD="b",
        EBB_MONITOR_PASSWORD="c",
        RABBITMQ_VHOST=f"ebb/never {uuid.uuid4().hex[:6]}",
    )
    assert refused.returncode != 0
    assert "HTTP 401" in refused.stderr and "RABBITMQ_ADMIN_PASSWORD" in refused.stderr, refused.stderr
    assert wrong not in refused.stderr + refused.stdout
