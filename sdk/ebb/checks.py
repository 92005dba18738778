"""Argument checks done before any broker work, so bad input loses nothing and says how to fix it."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from ebb import contract
from ebb.contract import QueueKind
from ebb.errors import InvalidArgumentError, InvalidArgumentTypeError
from ebb.job import Job
from ebb.logfmt import log_event


def validate_ttl(ttl: timedelta | float | None, *, default: timedelta, maximum: timedelta) -> timedelta:
    """Turn ``auto_cleanup_after_ttl`` into a timedelta, refusing what RabbitMQ could not honour."""
    if ttl is None:
        return default
    if isinstance(ttl, bool) or not isinstance(ttl, timedelta | int | float):
        raise InvalidArgumentTypeError(
            f"auto_cleanup_after_ttl must be a timedelta or a number of seconds, not {type(ttl).__name__}"
        )
    if isinstance(ttl, float) and not math.isfinite(ttl):
        raise InvalidArgumentError(f"auto_cleanup_after_ttl={ttl!r} is not a finite number of seconds")
    try:
        value = ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)
    except OverflowError:
        raise InvalidArgumentError(f"auto_cleanup_after_ttl={ttl!r} is far above EBB_MAX_TTL") from None
    if value < timedelta(milliseconds=1):
        raise InvalidArgumentError(
            f"auto_cleanup_after_ttl={ttl!r} must be at least 1 ms; every job queue expires, "
            "there is no 'never'"
        )
    if value > maximum:
        raise InvalidArgumentError(
            f"auto_cleanup_after_ttl={value} exceeds the maximum of {maximum}; "
            "use a shorter TTL or raise EBB_MAX_TTL"
        )
    return value


def job_timeout_seconds(value: timedelta | float | None) -> float | None:
    """``job_timeout`` as seconds: a positive, finite duration, or ``None`` for no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise InvalidArgumentTypeError(
            f"job_timeout must be a timedelta or a number of seconds, not {type(value).__name__}"
        )
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgumentError(f"job_timeout={value!r} must be a positive, finite duration")
    return seconds


def job_params(workflow: object, params: Mapping[str, Any] | None, max_bytes: int) -> dict[str, Any]:
    """The job's input as a dict that travels as JSON within ``EBB_MAX_PARAMS_BYTES``."""
    if not isinstance(workflow, str) or not workflow:
        raise InvalidArgumentError(f"workflow must be a non-empty string, not {workflow!r}")
    params_dict = dict(params or {})
    try:
        size = len(contract.encode(params_dict))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentTypeError(f"params for {workflow!r} must be JSON-serialisable: {exc}") from None
    if size > max_bytes:
        raise InvalidArgumentError(
            f"params for {workflow!r} are {size} bytes as JSON, over the limit of "
            f"{max_bytes} (EBB_MAX_PARAMS_BYTES); pass a reference "
            "(a path, a URL, a key) instead of the data itself"
        )
    return params_dict


def wanted_queues(on_progress: object, on_status: object, *, updates: bool = False) -> frozenset[QueueKind]:
    """The result queue always; progress and status when a callback (or ``updates``) wants them."""
    kinds = {QueueKind.RESULT}
    if on_progress is not None or updates:
        kinds.add(QueueKind.PROGRESS)
    if on_status is not None or updates:
        kinds.add(QueueKind.STATUS)
    return frozenset(kinds)


def reconnect_target(
    job: Job | uuid.UUID | str,
    wanted: frozenset[QueueKind],
    auto_cleanup_after_ttl: timedelta | float | None,
    *,
    default_ttl: timedelta,
    max_ttl: timedelta,
) -> tuple[uuid.UUID, Job | None]:
    """The job to reconnect to (and its ``Job`` if given), after checking what the call asks.

    A different TTL is validated, then logged as ignored: RabbitMQ fixes ``x-expires`` when a
    queue is declared. A callback for a queue the job was submitted without is refused.
    """
    known = job if isinstance(job, Job) else None
    job_id = known.id if known else contract.parse_job_id(job)
    if auto_cleanup_after_ttl is not None:
        requested = validate_ttl(auto_cleanup_after_ttl, default=default_ttl, maximum=max_ttl)
        if known is None or requested != known.ttl:
            log_event(
                logging.getLogger("ebb.client"),
                logging.WARNING,
                "ttl_not_changed",
                job_id=job_id,
                requested_ttl=requested,
                kept_ttl=known.ttl if known else "as submitted",
                reason="x-expires is fixed when a queue is declared",
            )
    if known is not None and not wanted <= known.queues:
        missing = ", ".join(sorted(k.value for k in wanted - known.queues))
        raise InvalidArgumentError(
            f"job {job_id} was submitted without a {missing} queue, so there is nothing to "
            f"deliver to that callback; drop it or submit with it next time"
        )
    return job_id, known
