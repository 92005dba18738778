"""The job registry in Redis: what must outlive a job's queues.

One hash per job, ``ebb:job:<uuid>``, written by the SDK at submission and when the result is
consumed, by the worker as the job runs, and by the audit when queues go away. Every write
renews the key's expiry (the job's TTL plus a grace period), so Redis never fills up.

Redis is a side channel: when it is down, writes are kept (one warning per outage) and jobs
carry on; only lookups (``JobClient.job_status``) fail, with a clear error. What was kept goes
out with the next write that gets through, filling only the fields nobody has set since: a job
submitted during an outage gets its record, and a worker's RUNNING is never set back to SUBMITTED.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import redis

from ebb import links
from ebb.config import Settings
from ebb.contract import QueueKind
from ebb.errors import RegistryUnavailableError, UnknownJobError
from ebb.job import Job
from ebb.logfmt import log_event
from ebb.records import FIELDS, KEY_PREFIX, JobRecord, job_key

logger = logging.getLogger("ebb.registry")

#: ``HMGET`` of the same fields (ARGV) from many hashes (KEYS) in one call; a missing field is nil.
HMGET_MANY = """
local rows = {}
for i, key in ipairs(KEYS) do rows[i] = redis.call('HMGET', key, unpack(ARGV)) end
return rows
"""
#: For each existing hash (KEYS[i]): ``queues_last_in_use`` = ARGV[1], expiry ARGV[i + 1] seconds.
#: One call per batch: the audit renews 100,000 jobs' records in seconds, not tens of seconds, and
#: a record deleted meanwhile is not brought back as a stub.
TOUCH_MANY = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'queues_last_in_use', ARGV[1])
    redis.call('EXPIRE', key, ARGV[i + 1])
  end
end
return #KEYS
"""
#: After a failed write, how long the registry stays quiet before trying Redis again.
RETRY_AFTER = 5.0
#: Jobs whose missed writes are kept for later; past this, the oldest are dropped (logged).
MAX_KEPT = 10_000


class Registry:
    """Writes never raise and never block for long; lookups raise when Redis is away."""

    def __init__(self, settings: Settings, *, timeout: float = 0.5) -> None:
        self._settings = settings
        self._redis = links.redis_client(settings, timeout=timeout, decode_responses=True)
        self._grace = settings.registry_grace
        self._quiet_until = 0.0
        self._hmget_many = self._redis.register_script(HMGET_MANY)
        self._touch_many = self._redis.register_script(TOUCH_MANY)
        self._lock = threading.Lock()
        #: Writes Redis missed: job id -> (TTL, fields, monotonic time the record expires).
        self._kept: dict[uuid.UUID, tuple[timedelta, dict[str, Any], float]] = {}

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def write(self, job_id: uuid.UUID, ttl: timedelta, fields: dict[str, Any]) -> bool:
        """Set ``fields`` and renew the record's expiry; ``False`` (logged) when Redis is away:
        then they are kept, and written later where nobody has set them since."""
        return self._write({job_id: (ttl, fields)}, 1000, job_id)

    def write_many(
        self, updates: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]], *, batch: int = 1000
    ) -> bool:
        """``write`` for many jobs (job id -> (TTL, fields)), one pipelined round trip per ``batch``."""
        return self._write(updates, batch, None)

    def _write(
        self,
        updates: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]],
        batch: int,
        job_id_for_log: uuid.UUID | None,
    ) -> bool:
        for _, fields in updates.values():
            if not fields.keys() <= _FIELDS:  # a typo would be a field nobody ever reads
                raise ValueError(f"not fields of a job's record: {sorted(fields.keys() - _FIELDS)}")
        if time.monotonic() < self._quiet_until:
            self._keep(updates)
            return False
        kept = self._take_kept()
        items = list(updates.items())
        try:
            if kept:
                pipe = self._redis.pipeline(transaction=False)
                for job_id, (ttl, fields) in kept.items():
                    self._stage_fill(pipe, job_id, ttl, fields)
                pipe.execute()
                log_event(logger, logging.INFO, "registry_writes_caught_up", jobs=len(kept))
                kept = {}
            for start in range(0, len(items), batch):
                pipe = self._redis.pipeline(transaction=False)
                for job_id, (ttl, fields) in items[start : start + batch]:
                    self._stage_write(pipe, job_id, ttl, fields)
                pipe.execute()
        except redis.RedisError as exc:
            self._keep(kept)
            self._keep(updates)  # some may have got through: writing them again changes nothing
            self._went_away(exc, job_id_for_log)
            return False
        return True

    def _keep(self, updates: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]]) -> None:
        now = time.monotonic()
        with self._lock:
            for job_id, (ttl, fields) in updates.items():
                _, before, _ = self._kept.pop(job_id, (ttl, {}, 0.0))
                self._kept[job_id] = (ttl, {**before, **fields}, now + ttl.total_seconds())
            while len(self._kept) > MAX_KEPT:
                dropped = next(iter(self._kept))
                del self._kept[dropped]
                log_event(logger, logging.WARNING, "registry_write_dropped", job_id=dropped)

    def _take_kept(self) -> dict[uuid.UUID, tuple[timedelta, dict[str, Any]]]:
        now = time.monotonic()
        with self._lock:
            kept, self._kept = self._kept, {}
        return {job_id: (ttl, fields) for job_id, (ttl, fields, until) in kept.items() if until > now}

    def _stage_fill(self, pipe: Any, job_id: uuid.UUID, ttl: timedelta, fields: dict[str, Any]) -> None:
        """A missed write, late: only fields still unset (the worker may have moved the job on)."""
        key = job_key(job_id)
        for name, value in {**fields, "ttl": ttl}.items():
            if value is not None:
                pipe.hsetnx(key, name, _encode(value))
        pipe.expire(key, max(1, int((ttl + self._grace).total_seconds())))

    def _stage_write(self, pipe: Any, job_id: uuid.UUID, ttl: timedelta, fields: dict[str, Any]) -> None:
        key = job_key(job_id)
        values: dict[Any, Any] = {  # redis-py's hset mapping type is invariant in its keys
            k: _encode(v) for k, v in fields.items() if v is not None
        }
        values["ttl"] = ttl.total_seconds()
        pipe.hset(key, mapping=values)
        pipe.expire(key, max(1, int((ttl + self._grace).total_seconds())))

    def begin_attempt(self, job_id: uuid.UUID, ttl: timedelta) -> tuple[int, JobRecord | None]:
        """Count one more run of the job and return (attempt number, record before this run).

        Raises ``redis.RedisError`` when Redis is away: the caller decides how to degrade.
        """
        key = job_key(job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(key)
        pipe.hincrby(key, "attempts", 1)
        pipe.expire(key, max(1, int((ttl + self._grace).total_seconds())))
        before, attempt, _ = pipe.execute()
        record = JobRecord.from_hash(job_id, before) if before else None
        return int(attempt), record

    def forget_attempt(self, job_id: uuid.UUID) -> None:
        """Undo ``begin_attempt`` for a copy of the task that does not run."""
        with contextlib.suppress(redis.RedisError):
            self._redis.hincrby(job_key(job_id), "attempts", -1)

    def cancel_requested(self, job_id: uuid.UUID) -> bool:
        """Raises ``redis.RedisError`` when Redis is away."""
        return bool(self._redis.hexists(job_key(job_id), "cancel_requested_at"))

    def touch_in_use(self, jobs: dict[uuid.UUID, timedelta], now: float, *, batch: int = 1000) -> None:
        """Record that these jobs' queues had a consumer at ``now``, and keep their records as
        long as their queues may live (one script call per ``batch`` jobs)."""
        items = list(jobs.items())
        try:
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                expiries = [max(1, int((ttl + self._grace).total_seconds())) for _, ttl in chunk]
                self._touch_many(keys=[job_key(job_id) for job_id, _ in chunk], args=[now, *expiries])
        except redis.RedisError as exc:
            self._went_away(exc, None)

    def _went_away(self, exc: Exception, job_id: uuid.UUID | None) -> None:
        with self._lock:
            first = self._quiet_until < time.monotonic()
            self._quiet_until = time.monotonic() + RETRY_AFTER
        if first:
            log_event(
                logger,
                logging.WARNING,
                "registry_unavailable",
                job_id=job_id,
                error=repr(exc),
                detail=f"jobs go on; registry writes skipped for {RETRY_AFTER:.0f}s",
            )

    def get(self, job_id: uuid.UUID) -> JobRecord | None:
        try:
            data = self._redis.hgetall(job_key(job_id))
        except redis.RedisError as exc:
            raise links.registry_error(exc, self._settings, "the job registry cannot be read") from exc
        if not data:
            return None
        return JobRecord.from_hash(job_id, {str(k): str(v) for k, v in data.items()})

    def record_of(self, job_id: uuid.UUID) -> JobRecord:
        """``get``, for a caller who names a job: ``UnknownJobError`` when there is no record."""
        record = self.get(job_id)
        if record is None:
            raise UnknownJobError(job_id)
        return record

    def request_cancel(self, job_id: uuid.UUID, now: float) -> JobRecord:
        """Record that the job's caller asked it to stop (workers look before and while it runs)."""
        record = self.record_of(job_id)
        if record.ttl is None or not self.write(job_id, record.ttl, {"cancel_requested_at": now}):
            raise RegistryUnavailableError(f"could not record the cancellation of job {job_id} in Redis")
        return record

    def describe(self, job_id: uuid.UUID, default_ttl: timedelta) -> tuple[Job, timedelta | None]:
        """A handle for a bare job id: workflow and TTL from the record, placeholders without one.

        The second value is the record's TTL, ``None`` when unknown: then the client leaves the
        record alone rather than overwrite it with a guess.
        """
        try:
            record = self.get(job_id)
        except RegistryUnavailableError:
            record = None
        queues = frozenset(QueueKind)  # unknown: cleanup covers all three names
        if record is None:
            return Job(job_id, "?", default_ttl, queues), None
        ttl = record.ttl or default_ttl
        return Job(job_id, record.workflow or "?", ttl, queues, record.reference), record.ttl

    def story(self, job_id: uuid.UUID) -> str:
        """What became of a job, for an error about its queues (never raises: it only adds colour)."""
        try:
            record = self.get(job_id)
        except RegistryUnavailableError as exc:
            return f"(The job registry could not be asked: {exc}.)"
        if record is None:
            return "The job registry has no record of it either: never submitted, or long forgotten."
        return f"Registry: {record.story()}."

    def read_fields(
        self, job_ids: Sequence[str], fields: Sequence[str], *, batch: int = 1000
    ) -> dict[str, list[str | None]]:
        """``fields`` of many records, by job id; jobs without a record are left out.

        Each batch is one server-side script call, not one command per job: at 10,000 jobs that
        is 10 round trips, whose replies hiredis parses in C.
        """
        found: dict[str, list[str | None]] = {}
        try:
            for start in range(0, len(job_ids), batch):
                chunk = job_ids[start : start + batch]
                rows = self._hmget_many(keys=[KEY_PREFIX + job_id for job_id in chunk], args=list(fields))
                for job_id, row in zip(chunk, rows, strict=True):
                    if any(value is not None for value in row):
                        found[job_id] = row
        except redis.RedisError as exc:
            raise links.registry_error(exc, self._settings, "the job registry cannot be read") from exc
        return found

    def get_many(self, job_ids: Sequence[uuid.UUID], *, batch: int = 1000) -> dict[uuid.UUID, JobRecord]:
        """Whole records of many jobs, one pipelined round trip per ``batch``."""
        found: dict[uuid.UUID, JobRecord] = {}
        try:
            for start in range(0, len(job_ids), batch):
                chunk = job_ids[start : start + batch]
                pipe = self._redis.pipeline(transaction=False)
                for job_id in chunk:
                    pipe.hgetall(job_key(job_id))
                for job_id, data in zip(chunk, pipe.execute(), strict=True):
                    if data:
                        found[job_id] = JobRecord.from_hash(job_id, data)
        except redis.RedisError as exc:
            raise links.registry_error(exc, self._settings, "the job registry cannot be read") from exc
        return found


_FIELDS = frozenset(FIELDS)


def _encode(value: Any) -> str | float | int:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return value
    return str(value)
