"""Which expiry RabbitMQ really applies to a job queue: its ``x-expires`` or a policy's ``expires``.

RabbitMQ applies to a queue at most one policy and one operator policy, each the matching one of
highest priority, and of an ``expires`` from several sources the smallest. The deployment's
operator policy on ``^jobs\\.`` (``deploy/rabbitmq-policy.sh``) is the safety net that makes even
a queue declared without ``x-expires`` go away; the audit reads the policies once per run and
works the effective expiry out itself (the queue listing it can afford carries no policy fields).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: The name and pattern the deployment's operator policy uses (deploy/rabbitmq-policy.sh).
POLICY_NAME = "ebb-job-queues"
POLICY_PATTERN = r"^jobs\."


@dataclass(frozen=True)
class Policy:
    name: str
    pattern: re.Pattern[str]
    priority: int
    expires_s: float | None
    operator: bool

    @classmethod
    def from_api(cls, raw: dict[str, Any], *, operator: bool) -> Policy | None:
        """One entry of ``/api/policies`` or ``/api/operator-policies``; None if not for queues."""
        if raw.get("apply-to", "all") not in ("all", "queues", "classic_queues", "quorum_queues"):
            return None
        try:
            pattern = re.compile(str(raw["pattern"]))
        except (KeyError, re.error):
            return None
        definition = raw.get("definition") or {}
        expires = definition.get("expires") if isinstance(definition, dict) else None
        return cls(
            name=str(raw.get("name", "")),
            pattern=pattern,
            priority=int(raw.get("priority") or 0),
            expires_s=expires / 1000 if isinstance(expires, int | float) else None,
            operator=operator,
        )


class ExpiryPolicies:
    """The vhost's policies, to answer "when does this queue expire" for many queues."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        ordered = sorted(policies, key=lambda p: -p.priority)
        self._user = [p for p in ordered if not p.operator]
        self._operator = [p for p in ordered if p.operator]

    def applied(self, queue: str) -> tuple[Policy | None, Policy | None]:
        """The user policy and the operator policy RabbitMQ applies to ``queue`` (if any)."""
        return _first_matching(self._user, queue), _first_matching(self._operator, queue)

    def effective_expires_s(self, queue: str, argument_s: float | None) -> float | None:
        """The smallest of the queue's own ``x-expires`` and its policies' ``expires``."""
        return self.resolve(queue, argument_s)[0]

    def resolve(self, queue: str, argument_s: float | None) -> tuple[float | None, Policy | None]:
        """The effective expiry and the operator policy applied, matched once (the audit asks
        this of 300,000 queues a run)."""
        user, operator = self.applied(queue)
        expires = argument_s
        for policy in (user, operator):
            if policy is not None and policy.expires_s is not None:
                expires = policy.expires_s if expires is None else min(expires, policy.expires_s)
        return expires, operator

    def safety_net(self, sample_queue: str) -> Policy | None:
        """The operator policy that would expire a job queue declared without ``x-expires``."""
        operator = self.applied(sample_queue)[1]
        return operator if operator is not None and operator.expires_s is not None else None


def _first_matching(policies: list[Policy], queue: str) -> Policy | None:
    """The first of ``policies`` (highest priority first) whose pattern matches ``queue``."""
    for policy in policies:
        if policy.pattern.search(queue):
            return policy
    return None
