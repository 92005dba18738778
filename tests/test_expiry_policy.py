"""The expiry safety net: deploy/rabbitmq-policy.sh's operator policy, and the audit that reads it.

A queue declared without ``x-expires`` (by hand, or by an old client) must still go away once
unused; RabbitMQ applies the smaller of the policy's ``expires`` and the queue's own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from kombu.connection import Connection

from ebb.config import Settings
from tasks.audit import NO_EXPIRY, Auditor
from tasks.expiry_policy import POLICY_NAME, ExpiryPolicies, Policy
from tests.support import ROOT, Management, broker_url_as, wait_until

SCRIPT = Path(ROOT, "deploy", "rabbitmq-policy.sh")


def apply_policy(settings: Settings, vhost: str, **env: str) -> None:
    """Run the deploy script as an operator would (the management user is an administrator here)."""
    subprocess.run(
        ["sh", str(SCRIPT)],
        check=True,
        timeout=60,
        capture_output=True,
        env={
            **os.environ,
            "RABBITMQ_URL": settings.management_url,
            "RABBITMQ_ADMIN_USER": settings.management_user,
            "RABBITMQ_ADMIN_PASSWORD": settings.management_password,
            "RABBITMQ_VHOST": vhost,
            **env,
        },
    )


@pytest.fixture
def short_policy(settings: Settings) -> Iterator[tuple[str, str]]:
    """The deploy script's policy with a 3 s expiry, on one job's queues only (so no other test
    is affected), above the deployment's own policy; removed afterwards."""
    job = uuid.uuid4()
    name = f"ebb-test-{job.hex[:8]}"
    apply_policy(
        settings,
        settings.vhost,
        POLICY_NAME=name,
        POLICY_PATTERN=rf"^jobs\.{job}\.",
        POLICY_PRIORITY="10",
        EBB_MAX_TTL="3",
    )
    yield name, f"jobs.{job}.result"
    vhost = quote(settings.vhost, safe="")
    requests.delete(
        f"{settings.management_url}/api/operator-policies/{vhost}/{name}",
        auth=(settings.management_user, settings.management_password),
        timeout=10,
    )


def test_a_hand_made_job_queue_without_x_expires_expires_under_the_policy(
    settings: Settings, management: Management, short_policy: tuple[str, str]
) -> None:
    name, queue = short_policy
    with Connection(settings.broker_url) as connection:
        connection.default_channel.queue_declare(queue, durable=True, auto_delete=False)  # no x-expires
    declared = time.monotonic()
    finding = next(f for f in Auditor(settings).run().findings if f.queue == queue)
    assert finding.expires_s == 3.0 and finding.state != NO_EXPIRY and finding.operator_policy == name
    assert wait_until(lambda: management.queue(queue) is None, 20), "the policy did not expire the queue"
    assert time.monotonic() - declared >= 2.5  # removed by its expiry, not at once


def test_the_audit_reports_a_missing_policy_once_per_run_until_it_is_applied(
    settings: Settings, private_vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    there = dataclasses.replace(settings, broker_url=broker_url_as(settings, vhost=private_vhost))
    with Connection(there.broker_url) as connection:  # a few job queues, two without x-expires
        for n in range(3):
            arguments = {"x-expires": 60_000} if n == 0 else None
            connection.default_channel.queue_declare(
                f"jobs.{uuid.uuid4()}.result", durable=True, auto_delete=False, arguments=arguments
            )
    auditor = Auditor(there)
    with caplog.at_level(logging.INFO, "ebb.audit"):
        for _ in range(2):
            report = auditor.run()
            assert report.expiry_policy is None
        missing = [line for line in caplog.text.splitlines() if "event=expiry_policy_missing" in line]
        assert len(missing) == 2, missing  # one line per run, not one per queue
        assert "deploy/rabbitmq-policy.sh" in missing[0] and "queues=3" in missing[0]
        assert sum(f.state == NO_EXPIRY for f in report.findings) == 2
        caplog.clear()
        apply_policy(settings, private_vhost, EBB_MAX_TTL=str(int(settings.max_ttl.total_seconds())))
        report = auditor.run()
    assert report.expiry_policy == POLICY_NAME
    assert "expiry_policy_missing" not in caplog.text
    assert {f.expires_s for f in report.findings} == {60.0, settings.max_ttl.total_seconds()}
    assert not any(f.state == NO_EXPIRY for f in report.findings)


# --- the rules, without a broker -----------------------------------------------------------


def policy(name: str, pattern: str, expires_s: float | None, *, priority: int = 0, operator: bool) -> Policy:
    return Policy(name, re.compile(pattern), priority, expires_s, operator)


def test_the_smallest_expiry_of_argument_and_applied_policies_wins() -> None:
    policies = ExpiryPolicies(
        [
            policy("net", r"^jobs\.", 604_800, operator=True),
            policy("short", r"^jobs\..*\.progress$", 60, priority=5, operator=True),
            policy("ignored-lower-priority", r"^jobs\.", 1, priority=-1, operator=True),
            policy("user", r"^jobs\.", 7_200, operator=False),
        ]
    )
    assert policies.effective_expires_s("jobs.x.result", None) == 7_200
    assert policies.effective_expires_s("jobs.x.result", 30) == 30
    assert policies.effective_expires_s("jobs.x.progress", 3_600) == 60
    assert policies.effective_expires_s("other", None) is None
    net = policies.safety_net("jobs.00000000-0000-0000-0000-000000000000.result")
    assert net is not None and net.name == "net"


def test_an_operator_policy_without_expires_is_no_safety_net() -> None:
    policies = ExpiryPolicies([policy("limits", r"^jobs\.", None, operator=True)])
    assert policies.safety_net("jobs.x.result") is None
    assert policies.effective_expires_s("jobs.x.result", None) is None
