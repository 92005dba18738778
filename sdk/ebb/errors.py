"""Every error Ebb raises on purpose: one root, ``EbbError``, each saying what went wrong and what to do.

No kombu, amqp, socket or redis exception reaches a caller; the transports translate them into
these, keeping the original as ``__cause__``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final

from ebb.redact import redact

if TYPE_CHECKING:
    from ebb.contract import JobResult


class EbbError(Exception):
    """Base class of every error Ebb raises on purpose."""


class UnavailableError(EbbError, ConnectionError):
    """A server Ebb needs (RabbitMQ, its management API, Redis) cannot be reached or did not answer."""


class InvalidArgumentError(EbbError, ValueError):
    """A call's argument cannot be used; nothing was sent. The message names it and the fix."""


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """A call's argument has a type Ebb cannot use (also a ``TypeError``); nothing was sent."""


class ConfigurationError(EbbError, ValueError):
    """An ``EBB_*`` environment variable holds a value Ebb cannot use; the message says which."""


class ClientUsageError(EbbError, RuntimeError):
    """The client was used where it cannot work, such as ``wait()`` from inside a callback."""


class WaitTimeoutError(EbbError, TimeoutError):
    """``wait()`` ran out of time; the job goes on, and its queues keep what arrives."""


class MalformedMessageError(EbbError, ValueError):
    """A message on a job queue or a task request that does not follow the wire contract."""


class RegistryUnavailableError(UnavailableError):
    """The job registry (Redis) could not be reached for a lookup or a write that must happen."""


class JobQueuesExpiredError(EbbError):
    """The job's result queue no longer exists: its TTL ran out, or its result was already consumed."""

    def __init__(self, job_id: uuid.UUID, detail: str | None = None) -> None:
        self.job_id = job_id
        message = (
            f"job {job_id}: its result queue jobs.{job_id}.result no longer exists. Either nobody "
            "was connected for longer than the job's TTL (auto_cleanup_after_ttl) and RabbitMQ "
            "deleted the queues with whatever they held, or the result was already consumed. "
            "Nothing can be reconnected; submit the job again if you still need its result."
        )
        if detail:
            message = f"{message} {detail}"
        super().__init__(message)


class QueueUnavailableError(UnavailableError):
    """A queue exists but cannot be used now: the RabbitMQ node that holds it is down or stopping.

    Durable queues and their persistent messages come back with their node; try again then.
    """

    def __init__(self, queue: str, node: str | None, detail: str = "") -> None:
        self.queue = queue
        self.node = node
        where = f"RabbitMQ node {node}" if node else "the RabbitMQ node holding it"
        super().__init__(
            detail
            or f"queue {queue} is on {where}, which is down or unreachable (not gone: it comes "
            "back with its node); try again once the node is back"
        )


class JobQueuesUnavailableError(QueueUnavailableError):
    """The job's queues are on a RabbitMQ node that is down: not expired, only out of reach."""

    def __init__(self, job_id: uuid.UUID, queue: str, node: str | None) -> None:
        self.job_id = job_id
        where = f"RabbitMQ node {node}" if node else "a RabbitMQ node"
        super().__init__(
            queue,
            node,
            f"job {job_id}: its queues are on {where}, which is down or unreachable. They are "
            "durable, not expired: the result waits there and comes back with the node. Call "
            "connect_to_submitted_job again once the node is back (their TTL counts from the "
            "node's return); ebb status shows what the worker recorded meanwhile.",
        )


class JobResultLostError(EbbError):
    """The job ended, but its worker could not deliver the result; the registry says how it ended.

    The worker keeps trying for ``EBB_RESULT_RETRY`` (a result queue whose node is down);
    past that, or when the queue had expired, it records what was lost. (A resource alarm
    loses nothing: RabbitMQ holds the result and confirms it once the alarm clears.)
    """

    def __init__(self, job_id: uuid.UUID, status: str | None, lost: str) -> None:
        self.job_id = job_id
        self.status = status
        self.lost = lost
        super().__init__(
            f"job {job_id} ended {status or 'in an unknown state'}, but its result will never arrive: "
            f"{lost}. The job's queues are deleted; submit it again if you need its output "
            f"(ebb status {job_id} shows what the worker recorded)"
        )


class JobFailedError(EbbError):
    """Raised by ``JobResult.raise_for_status()`` for a job that ended in ERROR."""

    def __init__(self, result: JobResult) -> None:
        self.result = result
        error = result.error
        what = f"{error.type}: {error.message}" if error else "no error details"
        super().__init__(f"job {result.job_id} ended {result.status.value}: {what}")


class CallbackError(EbbError):
    """A callback of yours raised; ``wait`` re-raises it here, with the job's result attached.

    When ``on_finished`` raised, the result message was put back in its queue instead of being
    deleted, so ``connect_to_submitted_job`` (here or in another process) delivers it again
    until the queue's TTL runs out. ``result`` holds it as well.
    """

    def __init__(self, job_id: uuid.UUID, callback: str, result: JobResult | None) -> None:
        self.job_id = job_id
        self.callback = callback
        self.result = result
        super().__init__(
            f"job {job_id}: your {callback} callback raised (see the chained exception); "
            + (
                f"the result was returned to jobs.{job_id}.result; reconnect with "
                "connect_to_submitted_job to receive it again"
                if callback == "on_finished"
                else "the job's other messages were still delivered"
            )
        )


class UnknownJobError(EbbError, LookupError):
    """The job registry has no record of this job id."""

    def __init__(self, job_id: uuid.UUID) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id} is unknown to the job registry: it was never submitted, or its record "
            "expired (records live for the job's TTL plus EBB_REGISTRY_GRACE)"
        )


class BrokerUnavailableError(UnavailableError):
    """RabbitMQ cannot be reached, or did not answer within its bound; the client reconnects by itself.

    ``job_id`` is set when a job's task may already have reached the broker (its confirm never
    came): do not submit it again. The client sends the task again once it has reconnected (a
    worker runs a job once), so ``connect_to_submitted_job(job_id)`` gets its result.
    """

    def __init__(self, message: str, *, job_id: uuid.UUID | None = None) -> None:
        self.job_id = job_id
        super().__init__(message)


class BrokerBlockedError(BrokerUnavailableError):
    """RabbitMQ blocked this client's connection: a memory or disk alarm is raised.

    While it lasts the broker reads nothing this connection publishes. ``reason`` is RabbitMQ's
    own word ("low on memory", "low on disk space"). ``job_id`` as for
    :class:`BrokerUnavailableError`: ``None`` when nothing was published (submit again once the
    alarm clears), the job's id when its task went out before the block (do not submit it
    again: ``connect_to_submitted_job(job_id)``).
    """

    def __init__(self, reason: str, detail: str, *, job_id: uuid.UUID | None = None) -> None:
        self.reason = reason
        super().__init__(
            f"RabbitMQ has blocked this client's connection ({reason}): a resource alarm is raised "
            f"on the broker, which reads nothing this client publishes until it clears; {detail}. "
            "Free memory or disk on the broker (rabbitmq-diagnostics alarms shows which)",
            job_id=job_id,
        )


class CredentialsRefusedError(UnavailableError):
    """A server refused Ebb's login: a wrong user or password, or a user without the vhost.

    Retrying does not help: the message says which URL's credentials to check (never the password).
    """


class BrokerCredentialsRefusedError(BrokerUnavailableError, CredentialsRefusedError):
    """RabbitMQ refused the user or password of EBB_BROKER_URL, or the user's access to its vhost."""


class RegistryCredentialsRefusedError(RegistryUnavailableError, CredentialsRefusedError):
    """Redis refused the credentials of EBB_REDIS_URL."""


class UnknownWorkflowError(EbbError, ValueError):
    """No live worker (or, with ``queue=None``, not this worker) runs this workflow; nothing was sent."""

    def __init__(self, workflow: str, known: list[str], queue: str | None = None) -> None:
        self.workflow = workflow
        self.known = known
        listed = ", ".join(known) if known else "none (is a worker running? celery -A tasks worker)"
        where = f"no worker on task queue {queue!r} runs" if queue else "this worker has no"
        super().__init__(
            f"{where} workflow {workflow!r}; known workflows: {listed}. "
            "Register it with @workflow and list its module in EBB_WORKFLOW_MODULES."
        )


class ClientClosedError(EbbError):
    """The client was closed, or lost its broker connection; its jobs keep their queues until TTL."""


class InvalidParamsError(InvalidArgumentError):
    """A job's params do not fit its workflow's schema; nothing was declared or sent.

    ``field`` is the parameter at fault (``None`` when the params as a whole are), ``value``
    what was given (``MISSING`` when absent) and ``expected`` what the schema wants there. A
    worker refuses params the same way when the job starts: the job ends ERROR, error type
    ``InvalidParamsError``.
    """

    MISSING: Final = "<missing>"

    def __init__(self, workflow: str, field: str | None, value: object, expected: str) -> None:
        self.workflow = workflow
        self.field = field
        self.value = value
        self.expected = expected
        shown = value if value == self.MISSING else _short_repr(value)
        where = f"parameter {field!r}" if field else "its params"
        super().__init__(f"workflow {workflow!r}: {where} = {shown}: expected {expected}")

    @classmethod
    def unknown(cls, workflow: str, field: str, value: object, known: list[str]) -> InvalidParamsError:
        """A parameter the workflow does not take (a typo, usually)."""
        error = cls(workflow, field, value, "no such parameter")
        takes = ", ".join(known) or "none"
        error.args = (
            f"workflow {workflow!r} has no parameter {field!r} (it takes: {takes}); drop it or fix its name",
        )
        return error


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def broker_unavailable(
    exc: BaseException, what: str, job_id: uuid.UUID | None = None
) -> BrokerUnavailableError:
    """A transport's error (py-amqp, aiormq, a socket) as the one a caller sees, the original as
    its cause, with no password in its text."""
    if isinstance(exc, BrokerUnavailableError):
        return exc
    error = BrokerUnavailableError(
        f"{what}: {redact(repr(exc))}; the client reconnects by itself", job_id=job_id
    )
    error.__cause__ = exc
    return error
