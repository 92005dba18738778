"""What RabbitMQ's answers to a queue probe mean for Ebb, as data: there, gone, or out of reach.

A 404 on a queue usually means it no longer exists (expired, deleted). On a cluster, the same
404 also answers for a classic queue whose home node is down or stopping: the queue is not
gone, and neither a caller nor a worker may treat it as expired. How RabbitMQ says so differs:

- 3.x answers at once: "home node '…' of durable queue … is down or inaccessible" (a killed
  node, named), "process is stopped by supervisor" (a node caught stopping);
- 4.x (Khepri) keeps a killed node's classic queues in its metadata as live: a passive declare
  (or a consume) of one gets no answer for about 60 s (it retries the queue 2,000 times, 30 ms
  apart), then a 404 "failed to perform operation on queue … due to timeout" naming no node; a
  stopped node's queues answer at once, as on 3.x. A publish to one is nacked, not returned.

So a probe is bounded by :data:`UNANSWERED_AFTER`: a queue that has not answered by then, while
the broker answers otherwise, is out of reach too (both clients, the same way).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from ebb.contract import QueueKind, queue_name
from ebb.errors import JobQueuesUnavailableError, QueueUnavailableError

_HOME_NODE_DOWN = re.compile(r"home node '([^']+)' of durable queue .* is down or inaccessible")
_STOPPING = ("process is stopped by supervisor", "is stopping", "shutdown")
#: RabbitMQ 4's late answers for a queue whose node was lost or whose leader is moving.
_NO_ANSWER = (" due to timeout", "may be stopping or being demoted")

#: Seconds a passive declare may go unanswered before its queue counts as out of reach (when
#: the broker answers on another channel meanwhile). A live queue answers within milliseconds;
#: RabbitMQ 4 keeps one whose node was killed unanswered for about 60 s (module docstring).
UNANSWERED_AFTER = 5.0
#: Queues probed at once (a channel each); RabbitMQ allows 2,047 channels per connection.
PROBE_BATCH = 100


@dataclass(frozen=True)
class Unreachable:
    """The queue exists on a node that cannot serve it now (``node`` when RabbitMQ named it)."""

    node: str | None


@dataclass(frozen=True)
class Present:
    """The queue answered a passive declare."""

    messages: int
    consumers: int


#: What a passive declare found: the queue, its absence (``None``), or that it is out of reach.
Probe = Present | Unreachable | None


def probe_bound(broker_timeout: float) -> float:
    """How long one probe waits for its queue's answer (never longer than EBB_BROKER_TIMEOUT)."""
    return min(UNANSWERED_AFTER, broker_timeout)


def queue_unreachable(reply_text: str) -> Unreachable | None:
    """``Unreachable`` when a NOT_FOUND (or similar) reply says the queue's node is down or stopping."""
    match = _HOME_NODE_DOWN.search(reply_text)
    if match:
        return Unreachable(match[1])
    if any(marker in reply_text for marker in (*_STOPPING, *_NO_ANSWER)):
        return Unreachable(None)
    return None


def job_queues_present(job_id: uuid.UUID, probes: Mapping[QueueKind, Probe]) -> set[QueueKind]:
    """The job's queues that exist; ``JobQueuesUnavailableError`` when one is out of reach.

    Without its result queue a job's other queues do not matter: the set then lacks RESULT
    (expired, whatever the rest answered). Both clients decide here.
    """
    if QueueKind.RESULT in probes and probes[QueueKind.RESULT] is None:
        return set()
    order = sorted(probes, key=lambda kind: kind is not QueueKind.RESULT)  # the result's reason first
    for kind in order:
        probe = probes[kind]
        if isinstance(probe, Unreachable):
            raise JobQueuesUnavailableError(job_id, queue_name(job_id, kind), probe.node)
    return {kind for kind, probe in probes.items() if isinstance(probe, Present)}


def consumers_reading(queue: str, probe: Probe) -> int:
    """How many consumers (workers) read a queue, from its probe: ``QueueUnavailableError``
    when its node is down, 0 when it does not exist."""
    if isinstance(probe, Unreachable):
        raise QueueUnavailableError(queue, probe.node)
    return probe.consumers if isinstance(probe, Present) else 0


def task_not_taken(queue: str, job_id: object, outcome: str, probe: Probe) -> str:
    """Why a job's task came back (``returned``) or was refused (``nacked``), from a probe of
    the task queue made then: gone, on a node that is down, or refused for another reason."""
    if isinstance(probe, Unreachable):
        return task_queue_unreachable(queue, probe.node, job_id)
    if probe is None:
        return (
            f"task queue {queue!r} does not exist, so job {job_id} was not submitted: start a "
            "worker (celery -A tasks worker) or check EBB_TASK_QUEUE"
        )
    return task_refused(job_id, outcome)


def task_refused(job_id: object, outcome: str) -> str:
    """Why a job was not submitted when RabbitMQ refused its task for another reason (or nobody
    could ask the task queue why)."""
    return f"RabbitMQ refused ({outcome}) the task of job {job_id}; it was not submitted"


def task_queue_unreachable(queue: str, node: str | None, job_id: object) -> str:
    """Why a job was not submitted when its task queue's node is down (both clients say this)."""
    where = f"RabbitMQ node {node}" if node else "a RabbitMQ node"
    return (
        f"task queue {queue!r} is on {where}, which is down or unreachable, so job {job_id} was not "
        "submitted; submit again once the node is back, or declare the task queue as a quorum "
        "queue on a cluster (EBB_TASK_QUEUE_TYPE=quorum) so that it survives the loss of a node"
    )
