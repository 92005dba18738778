"""Tasks the broker never confirmed, sent again after a reconnect: without I/O, for both clients.

A submit whose confirm never came (the connection died under it, or its bound ran out) raises
``BrokerUnavailableError`` with the job id: the task may be in the task queue, or lost with the
connection (chaos runs saw both: the queue declares arrived, the task did not). Left at that,
a caller who does as the error says (``connect_to_submitted_job``) waits for ever on a job that
never ran. So the client keeps the task and, after its next reconnect, declares the job's
queues again (same arguments: a no-op where they exist) and sends the same task again.
Workers run a job once: a copy that is not a redelivery is skipped once the job has begun
(``tasks.job``), so at-least-once sending gives one run and one result.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from ebb.job import Job

#: The transport's message (py-amqp's ``amqp.Message``; the asyncio client's properties and body).
Message = TypeVar("Message")


def unconfirmed_task(job_id: uuid.UUID, outcome: str, bound: float) -> str:
    """What a caller reads when a task's confirm never came: what happens next, what to do."""
    return (
        f"RabbitMQ did not confirm the task of job {job_id} ({outcome}, bound {bound:g} s); "
        "this client sends it again once it has reconnected (workers run a job once), so do not "
        f"submit it again: connect_to_submitted_job({str(job_id)!r}) waits for its result, and "
        f"ebb status {job_id} shows where it is"
    )


class UnsettledTasks(Generic[Message]):
    """Job id -> (job, task message), until the broker confirms a copy or the job's TTL ends."""

    def __init__(self) -> None:
        self._tasks: dict[uuid.UUID, tuple[Job, Message, float]] = {}

    def add(self, job: Job, message: Message, now: float) -> None:
        self._tasks[job.id] = (job, message, now + job.ttl.total_seconds())

    def job(self, job_id: uuid.UUID) -> Job | None:
        """The job, while its task waits to be sent again: its queues may not exist yet.

        ``connect_to_submitted_job`` then declares them (same arguments) before it looks, so
        that declares still on their way, or lost with the old connection, never read as expired.
        """
        entry = self._tasks.get(job_id)
        return entry[0] if entry is not None else None

    def discard(self, job_id: uuid.UUID) -> None:
        """The job's result reached this client: nothing left to send."""
        self._tasks.pop(job_id, None)

    def due(self, now: float) -> Iterator[tuple[Job, Message]]:
        """After a reconnect: every task to send again (those whose job outlived its TTL are dropped)."""
        for job_id, (job, message, until) in list(self._tasks.items()):
            if now > until:
                del self._tasks[job_id]
                continue
            yield job, message

    def settled(self, job: Job, outcome: str | None) -> list[tuple[str, int, dict[str, Any]]]:
        """The broker's answer to a copy: the log lines to write (event, level, fields)."""
        if outcome is None:
            self._tasks.pop(job.id, None)
            return [("job_task_resent", logging.INFO, {})]
        if outcome in ("returned", "nacked"):  # no task queue to take it: it cannot run
            self._tasks.pop(job.id, None)
            return [("job_task_not_taken", logging.WARNING, {"outcome": outcome})]
        return [("job_task_resend_unconfirmed", logging.WARNING, {"outcome": outcome})]

    def __len__(self) -> int:
        return len(self._tasks)
