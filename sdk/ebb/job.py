"""The caller's handle on a job: a small value object that survives a process restart as JSON."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ebb.contract import QueueKind, parse_job_id, queue_name
from ebb.errors import InvalidArgumentError


@dataclass(frozen=True)
class Job:
    """A submitted job: enough to reconnect to it later, from any process."""

    id: uuid.UUID
    workflow: str
    ttl: timedelta
    queues: frozenset[QueueKind]
    reference: str | None = None

    def queue_name(self, kind: QueueKind) -> str:
        return queue_name(self.id, kind)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": str(self.id),
                "workflow": self.workflow,
                "ttl": self.ttl.total_seconds(),
                "queues": sorted(k.value for k in self.queues),
                "reference": self.reference,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        try:
            data: Any = json.loads(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"not a Job JSON document (from Job.to_json()): {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError("not a Job JSON document (from Job.to_json()): expected an object")
        try:
            queues = frozenset(QueueKind(k) for k in data["queues"])
            ttl = float(data["ttl"])
            workflow = data["workflow"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"not a Job JSON document (from Job.to_json()): {exc!r}") from None
        if not isinstance(workflow, str) or ttl <= 0:
            raise InvalidArgumentError("not a Job JSON document (from Job.to_json()): bad workflow or ttl")
        reference = data.get("reference")
        return cls(
            id=parse_job_id(data.get("id")),
            workflow=workflow,
            ttl=timedelta(seconds=ttl),
            queues=queues | {QueueKind.RESULT},
            reference=reference if isinstance(reference, str) else None,
        )

    def __str__(self) -> str:
        return str(self.id)
