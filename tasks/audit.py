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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import redis

from ebb.config import Settings
from ebb.contract import QUEUE_NAME_PATTERN, QueueKind, parse_queue_name
from ebb.errors import RegistryUnavailableError
from ebb.logfmt import log_event, log_events
from ebb.records import JobRecord
from ebb.registry import Registry
from tasks.broker_api import BrokerAPI
from tasks.expiry_policy import POLICY_NAME, ExpiryPolicies

logger = logging.getLogger("ebb.audit")
T = TypeVar("T")

#: Audit memory in Redis, per RabbitMQ vhost (``{vhost}`` is filled in), so deployments sharing
#: a Redis never mix their findings.
SUSPECTS_KEY = "ebb:audit:{vhost}:suspects"
ORPHANS_KEY = "ebb:audit:{vhost}:orphans"
UNEXPIRING_KEY = "ebb:audit:{vhost}:unexpiring"
#: Management stats are refreshed every 5 s: a queue must look unused for longer than that
#: before it is called an orphan, so a stale ``consumers: 0`` never accuses a connected caller.
CONFIRM_AFTER = 12.0

#: The registry fields the audit reads per job (a whole record would cost 3x the time and memory).
AUDIT_FIELDS = ("status", "ttl")
#: Redis commands per pipeline round trip: bounded, so 30,000 queues never build one huge reply.
BATCH = 1000

#: ``HSETNX`` of many field/value pairs (ARGV) into one hash (KEYS[1]); 1 where this call set it.
HSETNX_MANY = """
local won = {}
for i = 1, #ARGV, 2 do won[#won + 1] = redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
return won
"""
#: ``HDEL`` of each field (ARGV) from one hash (KEYS[1]); 1 where this call deleted it.
HDEL_EACH = """
local won = {}
for i, field in ipairs(ARGV) do won[i] = redis.call('HDEL', KEYS[1], field) end
return won
"""

#: A job queue's name, to ask which operator policy would cover one declared without x-expires.
SAMPLE_JOB_QUEUE = "jobs.00000000-0000-0000-0000-000000000000.result"

IN_USE = "in_use"
#: On a cluster node that is down: out of reach, not orphaned, and never reported removed.
NODE_DOWN = "node_down"
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
    #: The operator policy RabbitMQ applies to the queue, if any (its expiry counts too).
    operator_policy: str | None = None
    #: The cluster node that holds the queue.
    node: str | None = None


@dataclass
class AuditReport:
    started_at: float
    duration_s: float = 0.0
    findings: list[QueueFinding] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    new_orphans: int = 0
    registry_available: bool = True
    #: The operator policy that expires job queues declared without x-expires (None: missing).
    expiry_policy: str | None = None
    #: Cluster nodes that are not running, as the answering node saw them.
    nodes_down: list[str] = field(default_factory=list)
    #: Where consumer counts came from: "management", or "prometheus" when the statistics are off.
    consumers_from: str = "management"

    def counts(self) -> dict[str, int]:
        counts = {IN_USE: 0, ORPHANED: 0, SUSPECT: 0, NO_EXPIRY: 0, NEW: 0, NODE_DOWN: 0}
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
            "expiry_policy": self.expiry_policy,
            "nodes_down": self.nodes_down,
            "consumers_from": self.consumers_from,
            "counts": self.counts(),
            "queues": [asdict(f) for f in self.findings],
            "removed": self.removed,
            "deleted": self.deleted,
        }


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(slots=True)
class _Memory:
    """What earlier audits left in Redis: queue name -> first seen unused / orphan memo."""

    suspects: dict[str, str]
    orphans: dict[str, str]
    unexpiring: set[str]


class Auditor:
    def __init__(self, settings: Settings, api: BrokerAPI | None = None, registry: Registry | None = None):
        self.settings = settings
        self.api = api or BrokerAPI(settings)
        self.registry = registry or Registry(settings, timeout=5.0)
        self.redis: redis.Redis = self.registry.client
        self.confirm_after = CONFIRM_AFTER
        self.suspects_key = SUSPECTS_KEY.format(vhost=settings.vhost)
        self.orphans_key = ORPHANS_KEY.format(vhost=settings.vhost)
        self.unexpiring_key = UNEXPIRING_KEY.format(vhost=settings.vhost)
        self._hsetnx_many = self.redis.register_script(HSETNX_MANY)
        self._hdel_each = self.redis.register_script(HDEL_EACH)

    def run(self, *, delete_unexpiring: bool | None = None) -> AuditReport:
        delete = self.settings.audit_delete_unexpiring if delete_unexpiring is None else delete_unexpiring
        started = time.monotonic()
        now = time.time()
        report = AuditReport(started_at=now)
        report.findings, memory, policies = self._gather()
        report.registry_available = memory is not None
        report.consumers_from = self.api.consumers_from
        clustered = self._report_down_nodes(report) > 1
        net = policies.safety_net(SAMPLE_JOB_QUEUE)
        report.expiry_policy = net.name if net is not None else None
        if net is None:  # once per run, not once per queue
            log_event(
                logger,
                logging.WARNING,
                "expiry_policy_missing",
                vhost=self.settings.vhost,
                queues=len(report.findings),
                detail="no operator policy expires jobs.* queues declared without x-expires: apply "
                f"deploy/rabbitmq-policy.sh (policy {POLICY_NAME}, expires = EBB_MAX_TTL)",
            )
        if memory is not None:
            try:
                self._reconcile(report, memory, now, delete, clustered)
            except redis.RedisError as exc:
                report.registry_available = False
                log_event(logger, logging.WARNING, "audit_degraded", error=repr(exc))
        else:
            self._log_orphans([f for f in report.findings if f.state == SUSPECT])
        report.duration_s = time.monotonic() - started
        log_event(
            logger,
            logging.INFO,
            "audit_summary",
            queues=len(report.findings),
            duration_ms=round(report.duration_s * 1000),
            registry="ok" if report.registry_available else "unavailable",
            consumers_from=report.consumers_from,
            **report.counts(),
        )
        return report

    def _gather(self) -> tuple[list[QueueFinding], _Memory | None, ExpiryPolicies]:
        """Every job queue, classified and with its job's registry status; the audit's memory.

        RabbitMQ takes seconds to list tens of thousands of queues: meanwhile this thread reads
        the memory and the registry records of the jobs seen last time, and only the jobs new to
        this run are looked up once the listing is in. ``None`` for memory when Redis is away.
        """
        memory: _Memory | None = None
        facts: dict[str, list[str | None]] = {}
        known: set[str] = set()
        policies = ExpiryPolicies(self.api.policies())
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ebb-audit-listing") as pool:
            listing = pool.submit(lambda: _classify_all(self.api.job_queues(), policies))
            try:
                memory = self._recall()
                known = {
                    job for name in memory.suspects.keys() | memory.orphans.keys() if (job := _job_id(name))
                }
                facts = self.registry.read_fields(sorted(known), AUDIT_FIELDS)
            except (redis.RedisError, RegistryUnavailableError) as exc:
                memory = None
                _log_degraded(exc)
            findings = listing.result()
        if memory is not None:
            new = {f.job_id for f in findings if f.job_id and f.job_id not in known}
            try:
                facts.update(self.registry.read_fields(sorted(new), AUDIT_FIELDS))
            except RegistryUnavailableError as exc:
                memory = None
                _log_degraded(exc)
        for finding in findings:
            fact = facts.get(finding.job_id) if finding.job_id else None
            if fact is not None:
                finding.registry_status = fact[0]
                finding.registered = True
        return findings, memory, policies

    def _recall(self) -> _Memory:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.suspects_key)
        pipe.hgetall(self.orphans_key)
        pipe.hkeys(self.unexpiring_key)
        suspects, orphans, unexpiring = pipe.execute()
        return _Memory(suspects, orphans, set(unexpiring))

    def _reconcile(
        self, report: AuditReport, memory: _Memory, now: float, delete: bool, clustered: bool
    ) -> None:
        suspects, orphans = memory.suspects, memory.orphans
        present: set[str] = set()
        in_use: set[str] = set()
        in_use_jobs: dict[uuid.UUID, float] = {}
        newly_suspect: list[QueueFinding] = []
        to_confirm: list[QueueFinding] = []
        for finding in report.findings:
            present.add(finding.queue)
            if finding.state == SUSPECT:
                first_seen = suspects.get(finding.queue)
                if first_seen is None:
                    newly_suspect.append(finding)
                    continue
                seen_at = _memo_time(first_seen)
                if finding.expires_s is not None:
                    # Unused since at least the first audit that saw it so: RabbitMQ removes it
                    # one TTL after it was last used, so no later than first_seen + TTL.
                    finding.idle_s = round(now - seen_at, 1)
                    finding.removal_estimate = seen_at + finding.expires_s
                if finding.queue in orphans:
                    finding.state = ORPHANED
                elif now - seen_at >= self.confirm_after:
                    finding.state = ORPHANED
                    to_confirm.append(finding)
            elif finding.state == IN_USE:
                in_use.add(finding.queue)
                if finding.registered and finding.job_id and finding.expires_s:
                    in_use_jobs[uuid.UUID(finding.job_id)] = finding.expires_s

        for group in _batches(newly_suspect):
            memos = [x for f in group for x in (f.queue, _orphan_memo(f, now))]
            self._hsetnx_many(keys=[self.suspects_key], args=memos)
        # On a cluster, remembered queues the listing left out are gone only if the broker no
        # longer declares them: a node killed a moment ago drops out of the listing before it is
        # seen down. (One node down answers no listing at all.)
        unlisted = (suspects.keys() | orphans.keys()) - present if clustered else set()
        if unlisted:
            present |= self.api.still_declared(unlisted)
        # A suspect gone before it was confirmed: its caller deleted it (the registry says so),
        # or the broker removed it, a TTL shorter than confirmation takes: an orphan all the
        # same, found and removed at once. Whoever deletes the suspect memo reports it.
        gone_suspects = [q for q in suspects if q not in present or q in in_use]
        expired_unconfirmed: list[tuple[str, str]] = []
        known: dict[uuid.UUID, JobRecord] = {}  # registry records read this run, by job
        for batch in _batches(gone_suspects):
            for queue, won in zip(batch, self._hdel_each(keys=[self.suspects_key], args=batch), strict=True):
                if won and queue not in present and queue not in orphans:
                    expired_unconfirmed.append((queue, suspects[queue]))

        # Orphans confirmed this run: exactly one auditor wins HSETNX and logs it.
        confirmed: list[QueueFinding] = []
        for group in _batches(to_confirm):
            memos = [x for f in group for x in (f.queue, _orphan_memo(f, now))]
            won = self._hsetnx_many(keys=[self.orphans_key], args=memos)
            confirmed.extend(finding for finding, first in zip(group, won, strict=True) if first)
        report.new_orphans += len(confirmed)
        self._log_orphans(confirmed)

        # Orphans seen before that are gone now (or have a consumer again): whoever deletes the
        # memo reports it.
        vanished = [q for q in orphans if q not in present or q in in_use]
        removed: list[tuple[str, str]] = []
        for batch in _batches(vanished):
            for queue, won in zip(batch, self._hdel_each(keys=[self.orphans_key], args=batch), strict=True):
                if not won:
                    continue
                if queue in in_use:
                    log_event(logger, logging.INFO, "orphan_reclaimed", job_id=_job_id(queue), queue=queue)
                else:
                    removed.append((queue, orphans[queue]))
        if expired_unconfirmed:
            removed += self._removed_by_broker(expired_unconfirmed, known)
        if removed:
            self._report_removed(report, removed, now, known)

        self._handle_unexpiring(report, memory.unexpiring, delete)
        if in_use_jobs:
            self.registry.touch_in_use({job: timedelta(seconds=s) for job, s in in_use_jobs.items()}, now)

    def _report_down_nodes(self, report: AuditReport) -> int:
        """One line per down node per run, with how many job queues wait on it (never orphans);
        the number of nodes in the cluster."""
        nodes = self.api.nodes()
        report.nodes_down = [name for name, running in nodes if not running]
        for node in report.nodes_down:
            log_event(
                logger,
                logging.WARNING,
                "broker_node_down",
                node=node,
                queues=sum(1 for f in report.findings if f.node == node),
                detail="its job queues are out of reach, not orphaned: they come back with the node",
            )
        return len(nodes)

    def _removed_by_broker(
        self, gone: list[tuple[str, str]], records: dict[uuid.UUID, JobRecord]
    ) -> list[tuple[str, str]]:
        """Of suspects gone before they were confirmed, those their caller did not delete:
        logged found now (they were orphans), for ``_report_removed`` to log removed.
        ``records`` gets their jobs' records, read here once for both."""
        records.update(self._records_of(gone))
        orphans: list[tuple[str, str]] = []
        for queue, memo in gone:
            parsed = parse_queue_name(queue)
            record = records.get(parsed[0]) if parsed else None
            if record is not None and _deleted_by_caller(record, parsed[1] if parsed else None):
                continue
            orphans.append((queue, memo))
            _, _, messages = memo.partition("|")
            log_event(
                logger,
                logging.WARNING,
                "orphan_found",
                job_id=_job_id(queue),
                queue=queue,
                messages=int(messages) if messages.isdigit() else None,
                idle_s=None,
                ttl_s=record.ttl.total_seconds() if record is not None and record.ttl else None,
                removal_estimate=None,
                registry_status=record.status if record is not None and record.status else "unknown",
                detail="removed by the broker (TTL) before this audit confirmed it",
            )
        return orphans

    def _log_orphans(self, findings: list[QueueFinding]) -> None:
        log_events(
            logger,
            logging.WARNING,
            "orphan_found",
            (
                {
                    "job_id": f.job_id,
                    "queue": f.queue,
                    "messages": f.messages,
                    "idle_s": f.idle_s,
                    "ttl_s": f.expires_s,
                    "removal_estimate": _iso(f.removal_estimate),
                    "registry_status": f.registry_status or "unknown",
                }
                for f in findings
            ),
        )

    def _records_of(self, queues: list[tuple[str, str]]) -> dict[uuid.UUID, JobRecord]:
        """The registry records of these queues' jobs ({} when Redis is away)."""
        job_ids = sorted({parsed[0] for q, _ in queues if (parsed := parse_queue_name(q))}, key=str)
        try:
            return self.registry.get_many(job_ids)
        except RegistryUnavailableError:
            return {}

    def _report_removed(
        self,
        report: AuditReport,
        removed: list[tuple[str, str]],
        now: float,
        known: dict[uuid.UUID, JobRecord],
    ) -> None:
        """Log each orphan the broker removed, with what was lost, and mark the jobs' records.
        ``known``: records already read this run (the rest are read here)."""
        parsed_names = {queue: parse_queue_name(queue) for queue, _ in removed}
        records = {
            **self._records_of([(q, m) for q, m in removed if (p := parsed_names[q]) and p[0] not in known]),
            **known,
        }
        updates: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]] = {}
        for queue, memo in removed:
            parsed = parsed_names[queue]
            job_id = parsed[0] if parsed else None
            record = records.get(job_id) if job_id else None
            lost = _what_was_lost(queue, memo, record)
            report.removed.append({"queue": queue, "job_id": str(job_id) if job_id else None, "lost": lost})
            log_event(logger, logging.WARNING, "orphan_removed", job_id=job_id, queue=queue, lost=lost)
            if job_id is None:
                continue
            # A job submitted while Redis was down has no record: write what the audit saw, so
            # that ebb status says its queues expired, not "unknown job" (found by the chaos run).
            ttl = record.ttl if record is not None and record.ttl is not None else self.settings.max_ttl
            fields = updates.setdefault(job_id, (ttl, {"queues_removed_at": now}))[1]
            delivered = record is not None and record.result_delivered
            if not delivered and parsed and parsed[1] is QueueKind.RESULT:
                fields["lost"] = lost
        if updates:
            self.registry.write_many(updates)

    def _handle_unexpiring(self, report: AuditReport, known: set[str], delete: bool) -> None:
        unexpiring = [f for f in report.findings if f.state == NO_EXPIRY]
        if unexpiring:
            stamp = repr(time.time())
            won = self._hsetnx_many(
                keys=[self.unexpiring_key], args=[x for f in unexpiring for x in (f.queue, stamp)]
            )
            for finding, first in zip(unexpiring, won, strict=True):
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
        stale = known - {f.queue for f in unexpiring}
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


def _log_degraded(exc: Exception) -> None:
    log_event(logger, logging.WARNING, "audit_degraded", error=repr(exc), detail="no registry, no dedup")


def _job_id(queue: str) -> str | None:
    match = QUEUE_NAME_PATTERN.match(queue)
    return match["job_id"] if match else None


def _classify_all(listing: list[dict[str, Any]], policies: ExpiryPolicies) -> list[QueueFinding]:
    """Findings in listing order, each raw entry freed as soon as it is classified."""
    listing.reverse()
    findings = []
    while listing:
        findings.append(_classify(listing.pop(), policies))
    return findings


def _classify(raw: dict[str, Any], policies: ExpiryPolicies) -> QueueFinding:
    name = str(raw["name"])
    arguments = raw.get("arguments")
    expires = arguments.get("x-expires") if isinstance(arguments, dict) else None
    # The expiry RabbitMQ applies: the smaller of x-expires and the policies' (the safety net).
    expires_s = policies.effective_expires_s(
        name, expires / 1000 if isinstance(expires, int | float) else None
    )
    operator = policies.applied(name)[1]
    consumers = _int(raw.get("consumers"))
    if raw.get("state") == "down":
        state = NODE_DOWN  # its node is down: nothing is known of its use, and it is not gone
    elif expires_s is None:
        state = NO_EXPIRY
    elif consumers is None:
        state = NEW  # the listing did not say: judge next time
    elif consumers > 0:
        state = IN_USE
    else:
        state = SUSPECT  # confirmed as ORPHANED in _reconcile once it stayed unused long enough
    # Idle time and removal estimate are filled in by _reconcile, from when the audit first saw
    # the queue unused (the stats-free listing has no idle_since); registry facts by _gather.
    return QueueFinding(
        queue=name,
        job_id=_job_id(name),
        state=state,
        consumers=consumers,
        messages=_int(raw.get("messages")),
        expires_s=expires_s,
        idle_s=None,
        removal_estimate=None,
        registry_status=None,
        registered=False,
        operator_policy=operator.name if operator is not None else None,
        node=str(raw["node"]) if raw.get("node") else None,
    )


def _batches(items: list[T]) -> Iterator[list[T]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _memo_time(memo: str) -> float:
    """When a memo was made (``"<time>|<messages>"``; older suspect memos hold the time alone)."""
    return float(memo.partition("|")[0])


def _deleted_by_caller(record: JobRecord, kind: QueueKind | None) -> bool:
    """The registry says the job's caller deleted this queue (it consumed the result, say)."""
    if record.queues_deleted_at is not None:
        return True
    return kind is QueueKind.RESULT and record.result_delivered


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
