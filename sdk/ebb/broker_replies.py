"""What RabbitMQ's error replies mean for Ebb, as data: a queue gone, or a queue out of reach.

A 404 on a queue usually means it no longer exists (expired, deleted). On a cluster, the same
404 also answers for a classic queue whose home node is down ("home node … is down or
inaccessible") or stopping ("process is stopped by supervisor"): the queue is not gone, and
neither a caller nor a worker may treat it as expired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HOME_NODE_DOWN = re.compile(r"home node '([^']+)' of durable queue .* is down or inaccessible")
_STOPPING = ("process is stopped by supervisor", "is stopping", "shutdown")


@dataclass(frozen=True)
class Unreachable:
    """The queue exists on a node that cannot serve it now (``node`` when RabbitMQ named it)."""

    node: str | None


def queue_unreachable(reply_text: str) -> Unreachable | None:
    """``Unreachable`` when a NOT_FOUND (or similar) reply says the queue's node is down or stopping."""
    match = _HOME_NODE_DOWN.search(reply_text)
    if match:
        return Unreachable(match[1])
    if any(marker in reply_text for marker in _STOPPING):
        return Unreachable(None)
    return None


def task_queue_unreachable(queue: str, node: str | None, job_id: object) -> str:
    """Why a job was not submitted when its task queue's node is down (both clients say this)."""
    where = f"RabbitMQ node {node}" if node else "a RabbitMQ node"
    return (
        f"task queue {queue!r} is on {where}, which is down or unreachable, so job {job_id} was not "
        "submitted; submit again once the node is back, or declare the task queue as a quorum "
        "queue on a cluster (EBB_TASK_QUEUE_TYPE=quorum) so that it survives the loss of a node"
    )
