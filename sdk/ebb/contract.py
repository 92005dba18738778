"""The wire contract between callers and workers: queue names and arguments, message schema, statuses.

Both ``ebb`` (the caller library) and ``tasks`` import this module; nothing else defines what
crosses the broker.
Everything on the wire is JSON; a message that does not match this schema raises
:class:`MalformedMessageError` rather than being guessed at.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, get_args

import msgspec
from kombu.entity import Queue
from msgspec import Meta, Struct

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
    """A job's statuses: RUNNING on its status queue; the final one is its result's status.

    RUNNING when a worker starts the job; then exactly one of SUCCEEDED, ERROR (the workflow
    raised, or its worker died too often), CANCELLED (``cancel_job``) or TIMEOUT (``job_timeout``),
    which ``on_status`` hears from the result, just before ``on_finished``.
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
QueueType = Literal["classic", "quorum"]
QUEUE_TYPES: Final = get_args(QueueType)


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
    arguments: dict[str, Any] = msgspec.to_builtins(JobQueueArguments(ttl_to_ms(ttl), queue_type))  # type: ignore[arg-type]
    return arguments


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
#
# Each message is a msgspec Struct: the type is the schema. msgspec checks types, ranges and
# the ``type`` tag while it parses (bench/bench_contract.py: a progress message in 0.55 us,
# 3.5x faster than pydantic and 12x faster than the hand-written checks it replaced), and
# docs/contract/ is generated from these types.

#: A message's schema version; a reader refuses any other (see :func:`decode`).
Version = Literal[1]
Seq = Annotated[int, Meta(ge=1, description="1, 2, 3... per queue and attempt, in publishing order")]
Attempt = Annotated[int, Meta(ge=1, description="Which run of the job sent this; 1 unless a worker died")]
Timestamp = Annotated[float, Meta(description="Seconds since the Unix epoch, when the worker sent it")]
FinalStatus = Annotated[
    JobStatus,
    Meta(extra_json_schema={"enum": sorted(s.value for s in JobStatus if s is not JobStatus.RUNNING)}),
]


class StatusUpdate(Struct, frozen=True, tag_field="type", tag="status"):
    """A status change of a running job, as delivered to ``on_status``."""

    job_id: uuid.UUID
    status: JobStatus
    seq: Seq
    at: Timestamp
    attempt: Attempt = 1
    v: Version = SCHEMA_VERSION


class ProgressUpdate(Struct, frozen=True, tag_field="type", tag="progress"):
    """How far a job is, 0.0 to 1.0, with a human-readable message; delivered to ``on_progress``."""

    job_id: uuid.UUID
    progress: Annotated[float, Meta(ge=0.0, le=1.0)]
    message: str
    seq: Seq
    at: Timestamp
    attempt: Attempt = 1
    v: Version = SCHEMA_VERSION


class JobError(Struct, frozen=True):
    """Why a job did not succeed: the exception as the worker saw it, and what the workflow logged."""

    type: str
    message: str
    traceback: str = ""
    logs: tuple[str, ...] = ()


class JobResult(Struct, frozen=True, kw_only=True, tag_field="type", tag="result"):
    """A job's one and only result, delivered to ``on_finished`` and returned by ``wait``.

    ``last_seq`` holds, per queue kind, the sequence number of the last status/progress
    message published before this result: the result can overtake them in the broker, so the
    SDK uses it to deliver those first.
    """

    job_id: uuid.UUID
    status: FinalStatus
    output: Any = None
    error: JobError | None = None
    last_seq: dict[str, int] = msgspec.field(default_factory=dict)
    at: Timestamp
    attempt: Attempt = 1
    v: Version = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in TERMINAL_STATUSES:
            raise ValueError(f"result status {self.status.value!r} is not a final status")

    @property
    def succeeded(self) -> bool:
        return self.status is JobStatus.SUCCEEDED

    def raise_for_status(self) -> JobResult:
        """Raise :class:`ebb.JobFailedError` unless the job SUCCEEDED (ERROR, CANCELLED, TIMEOUT)."""
        if self.status is not JobStatus.SUCCEEDED:
            raise JobFailedError(self)
        return self


class TaskRequest(Struct, frozen=True, tag_field="type", tag="task"):
    """The single argument of the ``ebb.run_job`` Celery task."""

    job_id: uuid.UUID
    workflow: str
    params: dict[str, Any]
    queues: frozenset[QueueKind]
    #: How long the job's unused queues survive, in seconds (``x-expires`` / 1000).
    ttl_seconds: Annotated[float, Meta(gt=0)] = msgspec.field(default=172_800.0, name="ttl")
    #: Longest running time in seconds (queued time does not count); ``None`` for no limit.
    timeout: Annotated[float, Meta(gt=0)] | None = None
    v: Version = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if QueueKind.RESULT not in self.queues:
            raise ValueError("task request lacks the result queue")

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.ttl_seconds)

    def to_celery_arg(self) -> dict[str, Any]:
        """The plain-JSON form Celery carries as the task's one argument."""
        arg: dict[str, Any] = msgspec.to_builtins(self, order="deterministic")
        return arg

    @classmethod
    def from_celery_arg(cls, raw: object) -> TaskRequest:
        """Read the task's argument; :class:`MalformedMessageError` if it does not fit the contract."""
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise MalformedMessageError(_explain(exc, raw, "task")) from None


class JobQueueArguments(Struct, frozen=True):
    """The arguments of every job queue, as its submitting client declares it (once)."""

    expires_ms: Annotated[int, Meta(ge=1, description="The job's TTL in ms")] = msgspec.field(
        name="x-expires"
    )
    queue_type: QueueType = msgspec.field(default="classic", name="x-queue-type")


Message = StatusUpdate | ProgressUpdate | JobResult
MESSAGE_TYPES: Final[dict[QueueKind, type[StatusUpdate] | type[ProgressUpdate] | type[JobResult]]] = {
    QueueKind.STATUS: StatusUpdate,
    QueueKind.PROGRESS: ProgressUpdate,
    QueueKind.RESULT: JobResult,
}
#: One decoder for the tagged union: a message without its ``type`` tag is refused, as before.
_DECODER: Final = msgspec.json.Decoder(Message)
_ENCODER: Final = msgspec.json.Encoder()


def message_type(message: Message) -> str:
    """The message's ``type`` tag on the wire: ``status``, ``progress`` or ``result``."""
    return str(type(message).__struct_config__.tag)


def is_persistent(message: Message) -> bool:
    """Whether a reply must survive a broker restart (delivery mode 2): the result only.

    Status and progress messages are transient, which spares RabbitMQ a disk write each. A
    broker restart may drop those that waited in a queue, never the job's outcome: the result
    carries the final status, and the client delivers it after its straggler grace, logging
    ``messages_missing``.
    """
    return isinstance(message, JobResult)


def encode(payload: Any) -> bytes:
    """Plain JSON, no NaN: what cannot be encoded is a ``TypeError``/``ValueError`` here, not later.

    For payloads the workflow made (params, outputs): the standard library refuses every
    non-JSON type, where msgspec would quietly turn NaN into null or a datetime into a string.
    """
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


def encode_message(message: Message) -> bytes:
    """A reply message as its wire JSON (its output was checked by :func:`encode` already)."""
    return _ENCODER.encode(message)


def decode(kind: QueueKind, body: bytes | str, content_type: str | None) -> Message:
    """Decode a job-queue message; raise :class:`MalformedMessageError` for anything else."""
    if content_type not in (None, CONTENT_TYPE):
        raise MalformedMessageError(
            f"content type {content_type!r} refused; job queues carry {CONTENT_TYPE} only"
        )
    try:
        message: Message = _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise MalformedMessageError(_explain(exc, body, kind.value)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedMessageError(f"message body is not JSON: {exc}") from None
    if type(message) is not MESSAGE_TYPES[kind]:
        raise MalformedMessageError(f"expected a {kind.value} message, got type {message_type(message)!r}")
    return message


def _explain(exc: msgspec.ValidationError, raw: object, expected_type: str) -> str:
    """Say why a message was refused, version and type first (only on this, the rare path)."""
    data = raw
    if isinstance(raw, bytes | str):
        with contextlib.suppress(ValueError):
            data = json.loads(raw)
    if not isinstance(data, dict):
        return f"a {expected_type} message must be a JSON object ({exc})"
    version = data.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        return (
            f"{expected_type} message has schema version {version!r}; this SDK reads version "
            f"{SCHEMA_VERSION} (upgrade the older side)"
        )
    if data.get("type") != expected_type:
        return f"expected a {expected_type} message, got type {data.get('type')!r}"
    return f"{expected_type} message refused: {exc}"


def now() -> float:
    return time.time()
