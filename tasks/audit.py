"""The orphaned-queue audit: what job queues the broker holds, and what it has since removed.

It reads queues only through the management HTTP API: probing a queue over AMQP (passive
declare, ``basic.get``) would renew its ``x-expires`` lease and keep an orphan alive for ever.
What it must remember between runs lives in Redis, with atomic ``HSETNX``/``HDEL`` deciding who
reports an event, so a restarted beat or several auditors never report anything twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import redis

from sdk.config import Settings
from sdk.contract import QueueKind, parse_queue_name
from sdk.logfmt import log_event
from sdk.registry import JobRecord, Registry, RegistryUnavailableError
from tasks.broker_api import BrokerAPI

logger = logging.getLogger("ebb.audit")

#: Audit memory in Redis, per RabbitMQ vhost (``{vhost}`` is filled in), so deployments sharing
#: a Redis never mix their findings.
SUSPECTS_KEY = "ebb:audit:{vhost}:suspects"
ORPHANS_KEY = "ebb:audit:{vhost}:orphans"
UNEXPIRING_KEY = "ebb:audit:{vhost}:unexpiring"
#: Management stats are refreshed every 5 s: a queue must look unused for longer than that
#: before it is called an orphan, so a stale ``consumers: 0`` never accuses a connected caller.
CONFIRM_AFTER = 12.0

#: The registry fields the audit needs (a whole record per job would cost 3x the time and memory).
AUDIT_FIELDS = ("status", "result_delivered", "ttl", "workflow")
#: Redis commands per pipeline round trip: bounded, so 30,000 queues never build one huge reply.
BATCH = 1000

IN_USE = "in_use"
ORPHANED = "orphaned"
NO_EXPIRY = "no_expiry"
SUSPECT = "suspect"
NEW = "new"


@dataclass(slots=True)
class QueueFinding:
    """One job queue as this audit saw it."""

    queue: str
    job_id: str | None
    state: str
    consumers: int | None
    messages: int | None
    expires_s: float | None
    idle_s: float | None
    removal_estimate: float | None
    registry_status: str | None
    registered: bool


@dataclass
class AuditReport:
    started_at: float
    duration_s: float = 0.0
    findings: list[QueueFinding] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    new_orphans: int = 0
    registry_available: bool = True

    def counts(self) -> dict[str, int]:
        counts = {IN_USE: 0, ORPHANED: 0, SUSPECT: 0, NO_EXPIRY: 0, NEW: 0}
        for finding in self.findings:
            counts[finding.state] = counts.get(finding.state, 0) + 1
        counts["unknown_to_registry"] = sum(1 for f in self.findings if not f.registered)
        counts["removed_since_last_run"] = len(self.removed)
        counts["new_orphans"] = self.new_orphans
        counts["deleted"] = len(self.deleted)
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "registry_available": self.registry_available,
            "counts": self.counts(),
            "queues": [asdict(f) for f in self.findings],
            "removed": self.removed,
            "deleted": self.deleted,
        }


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Auditor:
    def __init__(self, settings: Settings, api: BrokerAPI | None = None, registry: Registry | None = None):
        self.settings = settings
        self.api = api or BrokerAPI(settings)
        self.registry = registry or Registry(settings.redis_url, settings.registry_grace, timeout=5.0)
        self.redis: redis.Redis = self.registry.client
        self.confirm_after = CONFIRM_AFTER
        self.suspects_key = SUSPECTS_KEY.format(vhost=settings.vhost)
        self.orphans_key = ORPHANS_KEY.format(vhost=settings.vhost)
        self.unexpiring_key = UNEXPIRING_KEY.format(vhost=settings.vhost)

    def run(self, *, delete_unexpiring: bool | None = None) -> AuditReport:
        delete = self.settings.audit_delete_unexpiring if delete_unexpiring is None else delete_unexpiring
        started = time.monotonic()
        now = time.time()
        report = AuditReport(started_at=now)
        queues = [(raw, parse_queue_name(str(raw["name"]))) for raw in self.api.job_queues()]
        job_ids = {parsed[0] for _, parsed in queues if parsed}
        try:
            records = self.registry.get_many(list(job_ids), fields=AUDIT_FIELDS)
        except RegistryUnavailableError as exc:
            report.registry_available = False
            records = {}
            log_event(logger, logging.WARNING, "audit_degraded", error=exc, detail="no registry, no dedup")
        report.findings = [self._classify(raw, parsed, records) for raw, parsed in queues]
        del queues  # the raw listing is the biggest thing in memory: gone before reconciling
        if report.registry_available:
            try:
                self._reconcile(report, records, now, delete)
            except redis.RedisError as exc:
                report.registry_available = False
                log_event(logger, logging.WARNING, "audit_degraded", error=repr(exc))
        else:
            for finding in report.findings:
                if finding.state == ORPHANED:
                    self._log_orphan(finding)
        report.duration_s = time.monotonic() - started
        log_event(
            logger,
            logging.INFO,
            "audit_summary",
            queues=len(report.findings),
            duration_ms=round(report.duration_s * 1000),
            registry="ok" if report.registry_available else "unavailable",
            **report.counts(),
        )
        return report

    def _classify(
        self,
        raw: dict[str, Any],
        parsed: tuple[uuid.UUID, QueueKind] | None,
        records: dict[uuid.UUID, JobRecord],
    ) -> QueueFinding:
        name = str(raw["name"])
        job_id = parsed[0] if parsed else None
        record = records.get(job_id) if job_id else None
        arguments = raw.get("arguments") if isinstance(raw.get("arguments"), dict) else {}
        expires = arguments.get("x-expires") if arguments else None
        expires_s = expires / 1000 if isinstance(expires, int | float) else None
        consumers = _int(raw.get("consumers"))
        if expires_s is None:
            state = NO_EXPIRY
        elif consumers is None:
            state = NEW  # the listing did not say: judge next time
        elif consumers > 0:
            state = IN_USE
        else:
            state = SUSPECT  # confirmed as ORPHANED in _reconcile once it stayed unused long enough
        # Idle time and removal estimate are filled in by _reconcile, from when the audit first
        # saw the queue unused (the stats-free listing has no idle_since).
        return QueueFinding(
            queue=name,
            job_id=str(job_id) if job_id else None,
            state=state,
            consumers=consumers,
            messages=_int(raw.get("messages")),
            expires_s=expires_s,
            idle_s=None,
            removal_estimate=None,
            registry_status=record.status if record else None,
            registered=record is not None,
        )

    def _reconcile(
        self, report: AuditReport, records: dict[uuid.UUID, JobRecord], now: float, delete: bool
    ) -> None:
        present = {f.queue for f in report.findings}
        suspects: dict[str, str] = self.redis.hgetall(self.suspects_key)  # type: ignore[assignment]
        orphans: dict[str, str] = self.redis.hgetall(self.orphans_key)  # type: ignore[assignment]
        pipe = self.redis.pipeline(transaction=False)
        in_use_jobs: dict[uuid.UUID, float] = {}
        newly_suspect: list[QueueFinding] = []
        to_confirm: list[QueueFinding] = []
        for finding in report.findings:
            if finding.state == SUSPECT:
                first_seen = suspects.get(finding.queue)
                if first_seen is not None and finding.idle_s is None and finding.expires_s is not None:
                    # Unused since at least the first audit that saw it so: RabbitMQ removes it
                    # one TTL after it was last used, so no later than first_seen + TTL.
                    finding.idle_s = round(now - float(first_seen), 1)
                    finding.removal_estimate = float(first_seen) + finding.expires_s
                if finding.queue in orphans:
                    finding.state = ORPHANED
                elif first_seen is None:
                    newly_suspect.append(finding)
                elif now - float(first_seen) >= self.confirm_after:
                    finding.state = ORPHANED
                    to_confirm.append(finding)
            elif finding.state == IN_USE and finding.registered and finding.job_id and finding.expires_s:
                in_use_jobs[uuid.UUID(finding.job_id)] = finding.expires_s
        for i, finding in enumerate(newly_suspect, start=1):
            pipe.hsetnx(self.suspects_key, finding.queue, now)
            if i % BATCH == 0:
                pipe.execute()
        in_use = set(_names(report, (IN_USE,)))
        gone_suspects = [q for q in suspects if q not in present or q in in_use]
        if gone_suspects:
            pipe.hdel(self.suspects_key, *gone_suspects)
        pipe.execute()

        # Orphans confirmed this run: exactly one auditor wins HSETNX and logs it.
        for start in range(0, len(to_confirm), BATCH):
            batch = to_confirm[start : start + BATCH]
            pipe = self.redis.pipeline(transaction=False)
            for finding in batch:
                pipe.hsetnx(self.orphans_key, finding.queue, _orphan_memo(finding, now))
            for finding, won in zip(batch, pipe.execute(), strict=True):
                if won:
                    report.new_orphans += 1
                    self._log_orphan(finding)

        # Orphans seen before that are gone now (or have a consumer again).
        vanished = [q for q in orphans if q not in present or q in in_use]
        if vanished:
            pipe = self.redis.pipeline(transaction=False)
            for queue in vanished:
                pipe.hdel(self.orphans_key, queue)
            for queue, won in zip(vanished, pipe.execute(), strict=True):
                if won:
                    self._report_vanished(report, queue, orphans[queue], queue in in_use, records, now)

        self._handle_unexpiring(report, delete)
        if in_use_jobs:
            self.registry.touch_in_use({job: timedelta(seconds=s) for job, s in in_use_jobs.items()}, now)

    def _log_orphan(self, finding: QueueFinding) -> None:
        log_event(
            logger,
            logging.WARNING,
            "orphan_found",
            job_id=finding.job_id,
            queue=finding.queue,
            messages=finding.messages,
            idle_s=finding.idle_s,
            ttl_s=finding.expires_s,
            removal_estimate=_iso(finding.removal_estimate),
            registry_status=finding.registry_status or "unknown",
        )

    def _report_vanished(
        self,
        report: AuditReport,
        queue: str,
        memo: str,
        reclaimed: bool,
        records: dict[uuid.UUID, JobRecord],
        now: float,
    ) -> None:
        parsed = parse_queue_name(queue)
        job_id = parsed[0] if parsed else None
        if reclaimed:
            log_event(logger, logging.INFO, "orphan_reclaimed", job_id=job_id, queue=queue)
            return
        record = records.get(job_id) if job_id else None
        if record is None and job_id is not None:
            try:
                record = self.registry.get(job_id)
            except RegistryUnavailableError:
                record = None
        lost = _what_was_lost(queue, memo, record)
        report.removed.append({"queue": queue, "job_id": str(job_id) if job_id else None, "lost": lost})
        log_event(logger, logging.WARNING, "orphan_removed", job_id=job_id, queue=queue, lost=lost)
        if job_id is not None and record is not None and record.ttl is not None:
            fields: dict[str, Any] = {"queues_removed_at": now}
            if not record.result_delivered and parsed and parsed[1].value == "result":
                fields["lost"] = lost
            self.registry.write(job_id, record.ttl, fields)

    def _handle_unexpiring(self, report: AuditReport, delete: bool) -> None:
        unexpiring = [f for f in report.findings if f.state == NO_EXPIRY]
        if unexpiring:
            pipe = self.redis.pipeline(transaction=False)
            for finding in unexpiring:
                pipe.hsetnx(self.unexpiring_key, finding.queue, time.time())
            for finding, first in zip(unexpiring, pipe.execute(), strict=True):
                if first:
                    log_event(
                        logger,
                        logging.WARNING,
                        "queue_without_expiry",
                        job_id=finding.job_id,
                        queue=finding.queue,
                        consumers=finding.consumers,
                        messages=finding.messages,
                        action="deleting when unused"
                        if delete
                        else "kept (EBB_AUDIT_DELETE_UNEXPIRING=false)",
                    )
        present = {f.queue for f in unexpiring}
        stale = [q for q in self.redis.hkeys(self.unexpiring_key) if q not in present]
        if stale:
            self.redis.hdel(self.unexpiring_key, *stale)
        if not delete:
            return
        for finding in unexpiring:
            if finding.consumers != 0:
                continue  # in use, or stats not in yet: never delete what someone may be reading
            if self.api.delete_queue(finding.queue, if_unused=True):
                report.deleted.append(finding.queue)
                self.redis.hdel(self.unexpiring_key, finding.queue)
                log_event(
                    logger,
                    logging.WARNING,
                    "queue_deleted",
                    job_id=finding.job_id,
                    queue=finding.queue,
                    messages=finding.messages,
                    reason="no x-expires and no consumer",
                )


def _names(report: AuditReport, states: tuple[str, ...]) -> list[str]:
    return [f.queue for f in report.findings if f.state in states]


def _orphan_memo(finding: QueueFinding, now: float) -> str:
    return f"{now}|{finding.messages if finding.messages is not None else ''}"


def _what_was_lost(queue: str, memo: str, record: JobRecord | None) -> str:
    parsed = parse_queue_name(queue)
    kind = parsed[1].value if parsed else "unknown"
    _, _, messages = memo.partition("|")
    if kind == "result":
        if record is not None and record.result_delivered:
            return "nothing: the result had been delivered"
        if record is not None and record.status in ("SUBMITTED", "RUNNING"):
            return f"the job's result channel (job was {record.status} when its queues went)"
        return "result never delivered"
    if messages and messages != "0":
        return f"{messages} undelivered {kind} messages"
    return f"no {kind} messages were waiting"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
