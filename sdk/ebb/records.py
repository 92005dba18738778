"""The job registry's record as data: key names, fields and statuses, shared by callers and workers.

Like the wire contract, this is what both sides agree on, so it lives in the caller library and
``tasks`` imports it. ``ebb.registry`` does the Redis reads and writes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

#: One hash per job: ``ebb:job:<uuid>``.
KEY_PREFIX: Final = "ebb:job:"
#: One key per live worker: ``ebb:workers:<vhost>:<hostname>``, its advertisement (see ``ebb.workers``).
WORKERS_KEY_PREFIX: Final = "ebb:workers:"

#: Registry statuses: the caller writes SUBMITTED (or NOT_SUBMITTED when publishing failed), the
#: worker RUNNING and then the job's final status (``ebb.contract.JobStatus``).
SUBMITTED: Final = "SUBMITTED"
NOT_SUBMITTED: Final = "NOT_SUBMITTED"
FINAL_STATUSES: Final = frozenset({"SUCCEEDED", "ERROR", "CANCELLED", "TIMEOUT"})

#: Every field a record can hold; numbers are Unix times or seconds, flags "1"/"0".
FIELDS: Final = (
    "workflow",
    "reference",
    "ttl",
    "status",
    "submitted_at",
    "started_at",
    "finished_at",
    "result_delivered",
    "result_delivered_at",
    "queues_last_in_use",
    "queues_removed_at",
    "queues_deleted_at",
    "lost",
    "attempts",
    "cancel_requested_at",
)


def job_key(job_id: uuid.UUID) -> str:
    return f"{KEY_PREFIX}{job_id}"


@dataclass(frozen=True)
class JobRecord:
    """What the registry knows about a job, even after its queues are gone."""

    job_id: uuid.UUID
    workflow: str | None
    reference: str | None
    ttl: timedelta | None
    status: str | None
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    result_delivered: bool
    result_delivered_at: float | None
    queues_last_in_use: float | None
    queues_removed_at: float | None
    lost: str | None
    attempts: int = 0
    cancel_requested_at: float | None = None
    #: When the caller deleted the job's queues (with its result, or on a disconnect asking it).
    queues_deleted_at: float | None = None

    @classmethod
    def from_hash(cls, job_id: uuid.UUID, data: dict[str, str]) -> JobRecord:
        def number(key: str) -> float | None:
            raw = data.get(key)
            try:
                return float(raw) if raw not in (None, "") else None
            except ValueError:
                return None

        ttl = number("ttl")
        return cls(
            job_id=job_id,
            workflow=data.get("workflow"),
            reference=data.get("reference") or None,
            ttl=timedelta(seconds=ttl) if ttl is not None else None,
            status=data.get("status"),
            submitted_at=number("submitted_at"),
            started_at=number("started_at"),
            finished_at=number("finished_at"),
            result_delivered=data.get("result_delivered") == "1",
            result_delivered_at=number("result_delivered_at"),
            queues_last_in_use=number("queues_last_in_use"),
            queues_removed_at=number("queues_removed_at"),
            lost=data.get("lost") or None,
            attempts=int(number("attempts") or 0),
            cancel_requested_at=number("cancel_requested_at"),
            queues_deleted_at=number("queues_deleted_at"),
        )

    @property
    def queues_expire_at(self) -> float | None:
        """Earliest time the broker may delete the queues, if nobody uses them again."""
        if self.ttl is None or self.queues_last_in_use is None or self.queues_removed_at is not None:
            return None
        return self.queues_last_in_use + self.ttl.total_seconds()

    def story(self) -> str:
        """One sentence on what became of the job, for error messages and the CLI."""
        parts = [f"job {self.job_id} ({self.workflow or 'unknown workflow'})"]
        if self.status in FINAL_STATUSES and self.finished_at:
            parts.append(f"finished {self.status} at {_when(self.finished_at)}")
        elif self.status:
            parts.append(f"was last {self.status}")
        if self.result_delivered:
            parts.append(f"and its result was delivered at {_when(self.result_delivered_at)}")
        elif self.queues_removed_at:
            parts.append(
                f"and its queues were removed by the broker at about {_when(self.queues_removed_at)}"
                + (f" ({self.lost})" if self.lost else "")
            )
        elif self.lost:  # the worker said what became of the result (expired queue, node down)
            parts.append(f"but {self.lost}")
        elif self.queues_expire_at and self.queues_expire_at < time.time():
            parts.append(
                f"and its result was never delivered; its queues expired at about "
                f"{_when(self.queues_expire_at)} with whatever they held"
            )
        return " ".join(parts)


def _when(ts: float | None) -> str:
    if ts is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
