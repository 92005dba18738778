"""The wire contract between callers and workers: queue names and arguments, message schema, statuses.

Both ``ebb`` (the caller library) and ``tasks`` import this module; nothing else defines what
crosses the broker.
Everything on the wire is JSON; a message that does not match this schema raises
:class:`MalformedMessageError` rather than being guessed at.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any, Final

from kombu.entity import Queue

from ebb.errors import InvalidArgumentError, JobFailedError, MalformedMessageError

SCHEMA_VERSION: Final = 1
TASK_NAME: Final = "ebb.run_job"
CONTENT_TYPE: Final = "application/json"
QUEUE_PREFIX: Final = "jobs."
QUEUE_NAME_PATTERN: Final = re.compile(
    r"^jobs\.(?P<job_id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"\.(?P<kind>result|progress|status)$"
)
#: Regex for the management API's ``name`` filter (``use_regex=true``).
QUEUE_NAME_REGEX: Final = r"^jobs\."


class QueueKind(StrEnum):
    """The three reply queues a job can have; ``RESULT`` always exists."""

    RESULT = "result"
    PROGRESS = "progress"
    STATUS = "status"


class JobStatus(StrEnum):
    """Statuses a worker publishes on a job's status queue; all but RUNNING are also result statuses.

    RUNNING when a worker starts the job; then exactly one of SUCCEEDED, ERROR (the workflow
    raised, or its worker died too often), CANCELLED (``cancel_job``) or TIMEOUT (``job_timeout``).
    """

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"


TERMINAL_STATUSES: Final = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.ERROR, JobStatus.CANCELLED, JobStatus.TIMEOUT}
)


def parse_job_id(value: object) -> uuid.UUID:
    """Accept a UUID or its string form; anything else never reaches a queue name."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidArgumentError(
        f"job id {value!r} is not a UUID; pass the Job object or str(job.id) from submit_job"
    )


def queue_name(job_id: uuid.UUID, kind: QueueKind) -> str:
    return f"{QUEUE_PREFIX}{job_id}.{kind.value}"


def parse_queue_name(name: str) -> tuple[uuid.UUID, QueueKind] | None:
    """Split ``jobs.<uuid>.<kind>``; ``None`` for any other name."""
    match = QUEUE_NAME_PATTERN.match(name)
    if match is None:
        return None
    return uuid.UUID(match["job_id"]), QueueKind(match["kind"])


def ttl_to_ms(ttl: timedelta) -> int:
    return max(1, int(ttl.total_seconds() * 1000))


#: Job queue types (EBB_QUEUE_TYPE): "classic" (the default: cheapest, lives on its caller's
#: node) or "quorum" (replicated on a cluster: survives the loss of a node, about 4.7x the
#: broker CPU per job, bench/bench_cluster.py).
QUEUE_TYPES = ("classic", "quorum")


def job_queue(job_id: uuid.UUID, kind: QueueKind, ttl: timedelta, queue_type: str = "classic") -> Queue:
    """A job's reply queue: classic, durable, shared, never auto-deleted, expiring after ``ttl`` unused.

    RabbitMQ fixes ``x-expires`` at first declare, so only the submitting client declares
    actively; everyone else uses passive declares or none at all.
    """
    return Queue(
        queue_name(job_id, kind),
        durable=True,
        exclusive=False,
        auto_delete=False,
        queue_arguments=job_queue_arguments(ttl, queue_type),
    )


def job_queue_arguments(ttl: timedelta, queue_type: str = "classic") -> dict[str, Any]:
    """The arguments every job queue is declared with (by its submitting client only, once)."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"job queue type {queue_type!r}: use one of {', '.join(QUEUE_TYPES)}")
    return {"x-expires": ttl_to_ms(ttl), "x-queue-type": queue_type}


#: Task queue types a deployment may choose (EBB_TASK_QUEUE_TYPE). On a cluster, "quorum"
#: replicates the task queue, so workers and submits survive the loss of the node holding it.
TASK_QUEUE_TYPES = ("classic", "quorum")


def task_queue(name: str, queue_type: str = "classic") -> Queue:
    """The queue workers take job tasks from; only workers declare it (callers never do)."""
    if queue_type not in TASK_QUEUE_TYPES:
        raise ValueError(f"task queue type {queue_type!r}: use one of {', '.join(TASK_QUEUE_TYPES)}")
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    return Queue(name, durable=True, routing_key=name, queue_arguments=arguments)


# --- messages -------------------------------------------------------------------------------


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in data:
        raise MalformedMessageError(f"{what} lacks the field {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MalformedMessageError(f"{what} field {key!r} has the wrong type {type(value).__name__}")
    return value


def _check_header(data: object, expected_type: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise MalformedMessageError(f"a {expected_type} message must be a JSON object")
    version = data.get("v")
    if version != SCHEMA_VERSION:
        raise MalformedMessageError(
            f"{expected_type} message has schema version {version!r}; this SDK reads version "
            f"{SCHEMA_VERSION} (upgrade the older side)"
        )
    if data.get("type") != expected_type:
        raise MalformedMessageError(f"expected a {expected_type} message, got type {data.get('type')!r}")
    return data


@dataclass(frozen=True)
class StatusUpdate:
    """A status change of a running job, as delivered to ``on_status``."""

    job_id: uuid.UUID
    status: JobStatus
    seq: int
    at: float
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "type": "status",
            "job_id": str(self.job_id),
            "status": self.status.value,
            "seq": self.seq,
            "at": self.at,
            "attempt": self.attempt,
        }

    @classmethod
    def from_dict(cls, raw: object) -> StatusUpdate:
        data = _check_header(raw, "status")
        return cls(
            job_id=_job_id_field(data, "status message"),
            status=_status_field(data, "status message"),
            seq=_require(data, "seq", int, "status message"),
            at=float(_require(data, "at", (int, float), "status message")),
            attempt=_attempt(data, "status message"),
        )


@dataclass(frozen=True)
class ProgressUpdate:
    """How far a job is, 0.0 to 1.0, with a human-readable message; delivered to ``on_progress``."""

    job_id: uuid.UUID
    progress: float
    message: str
    seq: int
    at: float
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "type": "progress",
            "job_id": str(self.job_id),
            "progress": self.progress,
            "message": self.message,
            "seq": self.seq,
            "at": self.at,
            "attempt": self.attempt,
        }

    @classmethod
    def from_dict(cls, raw: object) -> ProgressUpdate:
        data = _check_header(raw, "progress")
        progress = float(_require(data, "progress", (int, float), "progress message"))
        if not 0.0 <= progress <= 1.0:
            raise MalformedMessageError(f"progress {progress} is outside 0.0..1.0")
        return cls(
            job_id=_job_id_field(data, "progress message"),
            progress=progress,
            message=_require(data, "message", str, "progress message"),
            seq=_require(data, "seq", int, "progress message"),
            at=float(_require(data, "at", (int, float), "progress message")),
            attempt=_attempt(data, "progress message"),
        )


@dataclass(frozen=True)
class JobError:
    """Why a job did not succeed: the exception as the worker saw it, and what the workflow logged."""

    type: str
    message: str
    traceback: str = ""
    logs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "message": self.message,
            "traceback": self.traceback,
            "logs": list(self.logs),
        }


@dataclass(frozen=True)
class JobResult:
    """A job's one and only result, delivered to ``on_finished`` and returned by ``wait``.

    ``last_seq`` holds, per queue kind, the sequence number of the last status/progress
    message published before this result: the result can overtake them in the broker, so the
    SDK uses it to deliver those first.
    """

    job_id: uuid.UUID
    status: JobStatus
    output: Any = None
    error: JobError | None = None
    last_seq: dict[str, int] = field(default_factory=dict)
    at: float = 0.0
    attempt: int = 1

    @property
    def succeeded(self) -> bool:
        return self.status is JobStatus.SUCCEEDED

    def raise_for_status(self) -> JobResult:
        """Raise :class:`ebb.JobFailedError` unless the job SUCCEEDED (ERROR, CANCELLED, TIMEOUT)."""
        if self.status is not JobStatus.SUCCEEDED:
            raise JobFailedError(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "type": "result",
            "job_id": str(self.job_id),
            "status": self.status.value,
            "output": self.output,
            "error": None if self.error is None else self.error.to_dict(),
            "last_seq": dict(self.last_seq),
            "at": self.at,
            "attempt": self.attempt,
        }

    @classmethod
    def from_dict(cls, raw: object) -> JobResult:
        data = _check_header(raw, "result")
        parsed = _status_field(data, "result message")
        if parsed not in TERMINAL_STATUSES:
            raise MalformedMessageError(f"result status {parsed.value!r} is not a final status")
        error_raw = data.get("error")
        error = None
        if error_raw is not None:
            if not isinstance(error_raw, dict):
                raise MalformedMessageError("result message field 'error' must be an object")
            logs = error_raw.get("logs", [])
            if not isinstance(logs, list) or not all(isinstance(line, str) for line in logs):
                raise MalformedMessageError("result error field 'logs' must be a list of strings")
            traceback = error_raw.get("traceback", "")
            error = JobError(
                type=str(_require(error_raw, "type", str, "result error")),
                message=str(_require(error_raw, "message", str, "result error")),
                traceback=traceback if isinstance(traceback, str) else "",
                logs=tuple(logs),
            )
        last_seq_raw = data.get("last_seq", {})
        if not isinstance(last_seq_raw, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in last_seq_raw.values()
        ):
            raise MalformedMessageError("result message field 'last_seq' must map kinds to ints")
        return cls(
            job_id=_job_id_field(data, "result message"),
            status=parsed,
            output=data.get("output"),
            error=error,
            last_seq={str(k): int(v) for k, v in last_seq_raw.items()},
            at=float(_require(data, "at", (int, float), "result message")),
            attempt=_attempt(data, "result message"),
        )


def _status_field(data: dict[str, Any], what: str) -> JobStatus:
    status = _require(data, "status", str, what)
    try:
        return JobStatus(status)
    except ValueError:
        raise MalformedMessageError(f"{what} has an unknown job status {status!r}") from None


def _attempt(data: dict[str, Any], what: str) -> int:
    """Which run of the job sent this (a job is re-run when its worker dies); 1 if absent."""
    value = data.get("attempt", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MalformedMessageError(f"{what} field 'attempt' must be a positive integer")
    return value


def _job_id_field(data: dict[str, Any], what: str) -> uuid.UUID:
    raw = _require(data, "job_id", str, what)
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise MalformedMessageError(f"{what} has a job_id that is not a UUID: {raw!r}") from None


@dataclass(frozen=True)
class TaskRequest:
    """The single argument of the ``ebb.run_job`` Celery task."""

    job_id: uuid.UUID
    workflow: str
    params: dict[str, Any]
    queues: frozenset[QueueKind]
    ttl: timedelta = timedelta(hours=48)
    #: Longest running time (queued time does not count); ``None`` for no limit.
    timeout: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "type": "task",
            "job_id": str(self.job_id),
            "workflow": self.workflow,
            "params": self.params,
            "queues": sorted(k.value for k in self.queues),
            "ttl": self.ttl.total_seconds(),
            "timeout": self.timeout,
        }

    @classmethod
    def from_dict(cls, raw: object) -> TaskRequest:
        data = _check_header(raw, "task")
        queues_raw = _require(data, "queues", list, "task request")
        try:
            queues = frozenset(QueueKind(k) for k in queues_raw)
        except ValueError:
            raise MalformedMessageError(f"task request names unknown queues {queues_raw!r}") from None
        if QueueKind.RESULT not in queues:
            raise MalformedMessageError("task request lacks the result queue")
        ttl = float(_require(data, "ttl", (int, float), "task request"))
        if not ttl > 0:
            raise MalformedMessageError(f"task request has a TTL of {ttl} s")
        timeout = data.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise MalformedMessageError(f"task request has an invalid timeout {timeout!r}")
        return cls(
            job_id=_job_id_field(data, "task request"),
            workflow=_require(data, "workflow", str, "task request"),
            params=_require(data, "params", dict, "task request"),
            queues=queues,
            ttl=timedelta(seconds=ttl),
            timeout=float(timeout) if timeout is not None else None,
        )


Message = StatusUpdate | ProgressUpdate | JobResult
MESSAGE_TYPES: Final[dict[QueueKind, type[StatusUpdate] | type[ProgressUpdate] | type[JobResult]]] = {
    QueueKind.STATUS: StatusUpdate,
    QueueKind.PROGRESS: ProgressUpdate,
    QueueKind.RESULT: JobResult,
}


def is_persistent(message: Message) -> bool:
    """Whether a reply must survive a broker restart (delivery mode 2): the result only.

    Status and progress messages are transient, which spares RabbitMQ a disk write each. A
    broker restart may drop those that waited in a queue, never the job's outcome: the result
    carries the final status, and the client delivers it after its straggler grace, logging
    ``messages_missing``.
    """
    return isinstance(message, JobResult)


def encode(payload: dict[str, Any]) -> bytes:
    """JSON only, no NaN: what cannot be encoded is a ``TypeError``/``ValueError`` here, not later."""
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


def decode(kind: QueueKind, body: bytes | str, content_type: str | None) -> Message:
    """Decode a job-queue message; raise :class:`MalformedMessageError` for anything else."""
    if content_type not in (None, CONTENT_TYPE):
        raise MalformedMessageError(
            f"content type {content_type!r} refused; job queues carry {CONTENT_TYPE} only"
        )
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessageError(f"message body is not JSON: {exc}") from None
    return MESSAGE_TYPES[kind].from_dict(raw)


def now() -> float:
    return time.time()
