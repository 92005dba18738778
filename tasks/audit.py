"""The orphaned-queue audit: what job queues the broker holds, and what it has since removed.

It reads queues only through the management HTTP API: probing a queue over AMQP (passive
declare, ``basic.get``) would renew its ``x-expires`` lease and keep an orphan alive for ever.
What it must remember between runs lives in Redis, with atomic ``HSETNX``/``HDEL`` deciding who
reports an event, so a restarted beat or several auditors never report anything twice.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

import redis

from ebb.config import Settings
from ebb.contract import QUEUE_NAME_PATTERN, QueueKind, parse_queue_name
from ebb.errors import RegistryUnavailableError
from ebb.logfmt import log_event, log_events
from ebb.records import JobRecord
from ebb.registry import Registry
from tasks import heap, metrics
from tasks.broker_api import BrokerAPI, ManagementError
from tasks.expiry_policy import POLICY_NAME, ExpiryPolicies
from tasks.streams import in_batches

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
AUDIT_FIELDS = ("status", "ttl", "queues_last_in_use")
#: A record whose queues were last seen in use less than this share of its TTL ago is not renewed
#: again (nor more than half the registry's grace ago): at 300,000 queues, renewing every job on
#: every run cost more than reading the registry.
RENEW_AFTER_SHARE_OF_TTL = 0.1
#: Queues without a consumer count asked to report again per run (one HTTP request each).
WAKE_PER_RUN = 1000
#: How long the audit waits for its registry prefetch to finish a read at the end (the Redis
#: client's own timeout, 5 s, bounds each read).
REGISTRY_TIMEOUT = 10.0
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


@dataclass(slots=True)
class _Seen:
    """This run's findings as the memory phases of ``_reconcile`` need them."""

    #: Every queue listed (on a cluster, plus the unlisted ones the broker still declares).
    present: set[str] = field(default_factory=set)
    in_use: set[str] = field(default_factory=set)
    #: Unused queues no earlier audit remembered: their first-seen memo is written now.
    newly_suspect: list[QueueFinding] = field(default_factory=list)
    #: Suspects unused for ``confirm_after``: orphans, reported by whoever memoizes them first.
    to_confirm: list[QueueFinding] = field(default_factory=list)


class _RegistryPass:
    """The registry's side of one audit, a batch of findings at a time: each job's record is read
    once (a job's three queues come in any order), and a job with a queue in use has its record
    renewed once, as long as that queue may live."""

    def __init__(self, registry: Registry, now: float, grace: timedelta) -> None:
        self._registry = registry
        self._now = now
        self._grace_s = grace.total_seconds()
        self._facts: dict[str, list[str | None]] = {}
        self._read: set[str] = set()
        self._renewed: set[str] = set()

    def read(self, jobs: Iterable[str]) -> None:
        """Read the records of ``jobs`` not read yet (``RegistryUnavailableError`` when Redis is away)."""
        unread = sorted(set(jobs) - self._read)
        if unread:
            self._facts.update(self._registry.read_fields(unread, AUDIT_FIELDS))
            self._read.update(unread)

    def take(self, batch: list[QueueFinding], *, expiry_from_record: bool) -> None:
        """Give ``batch``'s findings their jobs' registry facts; renew the in-use jobs' records."""
        self.read(f.job_id for f in batch if f.job_id)
        renew: dict[uuid.UUID, timedelta] = {}
        for finding in batch:
            fact = self._facts.get(finding.job_id) if finding.job_id else None
            if fact is None:
                continue
            finding.registry_status = fact[0]
            finding.registered = True
            if expiry_from_record:
                _expiry_from_record(finding, fact[1])
            job = finding.job_id
            if finding.state == IN_USE and finding.expires_s and job and job not in self._renewed:
                self._renewed.add(job)
                if self._renewal_due(fact[2], finding.expires_s):
                    renew[uuid.UUID(job)] = timedelta(seconds=finding.expires_s)
        if renew:
            self._registry.touch_in_use(renew, self._now)

    def _renewal_due(self, last_in_use: str | None, expires_s: float) -> bool:
        """Whether the record's ``queues_last_in_use`` is stale enough to write again: the record
        outlives its queues by the registry's grace, so a renewal skipped for less than half of
        it (and a tenth of the TTL) never lets it go first."""
        try:
            last = float(last_in_use) if last_in_use is not None else None
        except ValueError:
            last = None
        allowed = min(expires_s * RENEW_AFTER_SHARE_OF_TTL, self._grace_s / 2)
        return last is None or self._now - last >= allowed


class _Prefetch:
    """Reads the registry records of queues' jobs while their counts stream in, before the
    listing can hand the queues out (Prometheus says which queues exist only after every count):
    by then most records are read. Best effort, on a thread of its own; whatever it missed or
    failed to read is read when the queue is handed out."""

    def __init__(self, registry: _RegistryPass) -> None:
        self._registry = registry
        self._offered: set[str] = set()
        self._jobs: SimpleQueue[str | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ebb-audit-prefetch", daemon=True)
        self._started = False

    def offer(self, job: str | None) -> None:
        """The job of a queue whose count was just read (called on the threads reading the
        answers; a job's queues come in one share, and one offered twice is only read twice)."""
        if job is not None and job not in self._offered:
            self._offered.add(job)
            self._jobs.put(job)

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self) -> None:
        if self._started:
            self._jobs.put(None)
            self._thread.join(timeout=REGISTRY_TIMEOUT)

    def _run(self) -> None:
        done = False
        while not done:
            jobs: list[str] = []
            job = self._jobs.get()
            while job is not None:
                jobs.append(job)
                if len(jobs) >= BATCH:
                    break
                try:
                    job = self._jobs.get_nowait()
                except Empty:
                    break
            done = job is None
            try:
                self._registry.read(jobs)
            except RegistryUnavailableError:
                return  # the main thread meets the same and degrades


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
        heap.release_large_blocks()
        started = time.monotonic()
        now = time.time()
        report = AuditReport(started_at=now)
        report.findings, memory, policies = self._gather(now)
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

    def _gather(self, now: float) -> tuple[list[QueueFinding], _Memory | None, ExpiryPolicies]:
        """Every job queue, classified and with its job's registry status; the audit's memory.

        RabbitMQ takes seconds per 100,000 queues to render its listing, which streams in on a
        thread of its own: meanwhile this thread reads the audit's memory, then looks up each
        batch's jobs in the registry and renews the records of jobs whose queues are in use, so
        that little is left to do once the last queue is in. ``None`` for memory when Redis is away.
        """
        policies = ExpiryPolicies(self.api.policies())
        # With the safety net in place every job queue expires, whatever its arguments: the
        # audit can do without them, and without the slow management listing that has them.
        netted = policies.safety_net(SAMPLE_JOB_QUEUE) is not None
        registry = _RegistryPass(self.registry, now, self.settings.registry_grace)
        prefetch = _Prefetch(registry)
        early: dict[str, QueueFinding] = {}  # classified as its count came, handed out once listed

        def counted(raw: dict[str, Any]) -> None:
            finding = early[raw["name"]] = _classify(raw, policies)
            prefetch.offer(finding.job_id)

        def classified() -> Iterator[QueueFinding]:
            for raw in self.api.job_queues(arguments=not netted, on_counted=counted):
                found = early.pop(raw["name"], None)
                yield found if found is not None else _classify(raw, policies)

        listing = in_batches([classified], BATCH, name="ebb-audit-listing")
        memory: _Memory | None = None
        try:
            memory = self._recall()
            remembered = memory.suspects.keys() | memory.orphans.keys()
            registry.read(job for name in remembered if (job := _job_id(name)))
            prefetch.start()
        except (redis.RedisError, RegistryUnavailableError) as exc:
            memory = None
            _log_degraded(exc)
        findings: list[QueueFinding] = []
        try:
            for batch in listing:
                findings += batch
                if memory is None:
                    continue
                try:
                    registry.take(batch, expiry_from_record=not self.api.arguments_listed)
                except RegistryUnavailableError as exc:
                    memory = None
                    _log_degraded(exc)
        finally:
            prefetch.stop()
        self._wake_missing_counts(findings)
        unused = [f for f in findings if f.consumers == 0 and f.messages is None]
        if unused and self.api.consumers_from == "prometheus":
            # Message counts cost Prometheus twice the consumers' time and matter only for what
            # an unused queue (an orphan) holds: asked only now, and only when there is one.
            messages = self.api.messages()
            for finding in unused:
                finding.messages = messages.get(finding.queue, 0)
        return findings, memory, policies

    def _wake_missing_counts(self, findings: list[QueueFinding]) -> None:
        """Queues listed without a consumer count (``new``): their metrics row is gone, and they are
        asked to report again, at most ``WAKE_PER_RUN`` a run, to be judged by the next audit."""
        if self.api.consumers_from != "prometheus":
            return
        missing = [f.queue for f in findings if f.state == NEW and f.consumers is None]
        if not missing:
            return
        try:
            woken = self.api.wake_counts(missing[:WAKE_PER_RUN])
        except ManagementError as exc:
            woken = 0
            log_event(logger, logging.WARNING, "audit_degraded", error=repr(exc), detail="counts not woken")
        log_event(
            logger,
            logging.INFO,
            "queue_counts_missing",
            queues=len(missing),
            woken=woken,
            detail="RabbitMQ dropped their metrics rows; judged once they report again",
        )

    def _recall(self) -> _Memory:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.suspects_key)
        pipe.hgetall(self.orphans_key)
        pipe.hkeys(self.unexpiring_key)
        suspects, orphans, unexpiring = pipe.execute()
        return _Memory(_interned(suspects), _interned(orphans), set(unexpiring))

    def _reconcile(
        self, report: AuditReport, memory: _Memory, now: float, delete: bool, clustered: bool
    ) -> None:
        """This run's findings against what earlier audits remembered, phase by phase, in an order
        that matters: each phase's atomic Redis calls decide which auditor reports what."""
        seen = self._sort_findings(report.findings, memory, now)
        self._set_memos(self.suspects_key, seen.newly_suspect, now)
        if clustered:
            seen.present |= self._unlisted_still_declared(memory, seen.present)
        gone_unconfirmed = self._forget_gone_suspects(memory, seen)
        self._confirm_orphans(report, seen.to_confirm, now)
        removed = self._forget_vanished_orphans(memory.orphans, seen)
        known: dict[uuid.UUID, JobRecord] = {}  # registry records read this run, by job
        if gone_unconfirmed:
            removed += self._removed_by_broker(gone_unconfirmed, known)
        if removed:
            self._report_removed(report, removed, now, known)
        self._handle_unexpiring(report, memory.unexpiring, delete)

    def _sort_findings(self, findings: list[QueueFinding], memory: _Memory, now: float) -> _Seen:
        """Which queues are here and in use, and which suspects are new or due for confirmation
        (the memory's phases act on these); suspects remembered long enough become orphans."""
        seen = _Seen()
        for finding in findings:
            seen.present.add(finding.queue)
            if finding.state == SUSPECT:
                self._judge_suspect(seen, finding, memory, now)
            elif finding.state == IN_USE:
                seen.in_use.add(finding.queue)
        return seen

    def _judge_suspect(self, seen: _Seen, finding: QueueFinding, memory: _Memory, now: float) -> None:
        """An unused queue: new, still a suspect, an orphan already reported, or one to confirm."""
        first_seen = memory.suspects.get(finding.queue)
        if first_seen is None:
            seen.newly_suspect.append(finding)
            return
        seen_at = _memo_time(first_seen)
        if finding.expires_s is not None:
            # Unused since at least the first audit that saw it so: RabbitMQ removes it
            # one TTL after it was last used, so no later than first_seen + TTL.
            finding.idle_s = round(now - seen_at, 1)
            finding.removal_estimate = seen_at + finding.expires_s
        if finding.queue in memory.orphans:
            finding.state = ORPHANED
        elif now - seen_at >= self.confirm_after:
            finding.state = ORPHANED
            seen.to_confirm.append(finding)

    def _unlisted_still_declared(self, memory: _Memory, present: set[str]) -> set[str]:
        """On a cluster, remembered queues the listing left out are gone only if the broker no
        longer declares them: a node killed a moment ago drops out of the listing before it is
        seen down. (One node down answers no listing at all.)"""
        unlisted = (memory.suspects.keys() | memory.orphans.keys()) - present
        return self.api.still_declared(unlisted) if unlisted else set()

    def _forget_gone_suspects(self, memory: _Memory, seen: _Seen) -> list[tuple[str, str]]:
        """A suspect gone before it was confirmed: its caller deleted it (the registry says so),
        or the broker removed it, a TTL shorter than confirmation takes: an orphan all the
        same, found and removed at once. Whoever deletes the suspect memo reports it: returned
        here with its memo, for ``_removed_by_broker`` to tell which."""
        gone = [q for q in memory.suspects if q not in seen.present or q in seen.in_use]
        return [
            (queue, memory.suspects[queue])
            for queue in self._delete_memos(self.suspects_key, gone)
            if queue not in seen.present and queue not in memory.orphans
        ]

    def _confirm_orphans(self, report: AuditReport, to_confirm: list[QueueFinding], now: float) -> None:
        """Orphans confirmed this run: exactly one auditor wins HSETNX and logs it."""
        confirmed = self._set_memos(self.orphans_key, to_confirm, now)
        report.new_orphans += len(confirmed)
        metrics.orphans_found(len(confirmed))
        self._log_orphans(confirmed)

    def _forget_vanished_orphans(self, orphans: dict[str, str], seen: _Seen) -> list[tuple[str, str]]:
        """Orphans seen before that are gone now (or have a consumer again): whoever deletes the
        memo reports it, a reclaimed one here, a removed one returned with its memo."""
        vanished = [q for q in orphans if q not in seen.present or q in seen.in_use]
        removed: list[tuple[str, str]] = []
        for queue in self._delete_memos(self.orphans_key, vanished):
            if queue in seen.in_use:
                log_event(logger, logging.INFO, "orphan_reclaimed", job_id=_job_id(queue), queue=queue)
            else:
                removed.append((queue, orphans[queue]))
        return removed

    def _set_memos(self, key: str, findings: list[QueueFinding], now: float) -> list[QueueFinding]:
        """``HSETNX`` each finding's memo into the hash ``key``: the findings whose memo this call set
        (this auditor, and no other, reports those)."""
        won_here: list[QueueFinding] = []
        for group in _batches(findings):
            memos = [x for f in group for x in (f.queue, _orphan_memo(f, now))]
            won = self._hsetnx_many(keys=[key], args=memos)
            won_here.extend(finding for finding, first in zip(group, won, strict=True) if first)
        return won_here

    def _delete_memos(self, key: str, queues: list[str]) -> Iterator[str]:
        """``HDEL`` each queue's memo from the hash ``key``, a batch per round trip: yields the queues
        whose memo this call deleted (this auditor, and no other, reports those)."""
        for batch in _batches(queues):
            won = self._hdel_each(keys=[key], args=batch)
            yield from (queue for queue, deleted in zip(batch, won, strict=True) if deleted)

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
            _log_found_removed(queue, memo, record)
        metrics.orphans_found(len(orphans))
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
        records = self._records_of_removed(removed, parsed_names, known)
        updates: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]] = {}
        for queue, memo in removed:
            parsed = parsed_names[queue]
            job_id = parsed[0] if parsed else None
            record = records.get(job_id) if job_id else None
            loss = _what_was_lost(queue, memo, record)
            lost = loss.text
            report.removed.append({"queue": queue, "job_id": str(job_id) if job_id else None, "lost": lost})
            log_event(logger, logging.WARNING, "orphan_removed", job_id=job_id, queue=queue, lost=lost)
            metrics.orphan_removed(loss.kind, loss.result_lost, loss.messages)
            if parsed is not None:
                self._mark_removed(updates, parsed, record, lost, now)
        if updates:
            self.registry.write_many(updates)

    def _records_of_removed(
        self,
        removed: list[tuple[str, str]],
        parsed_names: dict[str, tuple[uuid.UUID, QueueKind] | None],
        known: dict[uuid.UUID, JobRecord],
    ) -> dict[uuid.UUID, JobRecord]:
        """The records of the removed queues' jobs: ``known`` ones as read earlier this run, the
        rest read now."""
        unread = [(q, m) for q, m in removed if (p := parsed_names[q]) and p[0] not in known]
        return {**self._records_of(unread), **known}

    def _mark_removed(
        self,
        updates: dict[uuid.UUID, tuple[timedelta, dict[str, Any]]],
        parsed: tuple[uuid.UUID, QueueKind],
        record: JobRecord | None,
        lost: str,
        now: float,
    ) -> None:
        """Add to ``updates`` when the job's queues went and, for an undelivered result, what was
        lost."""
        job_id, kind = parsed
        # A job submitted while Redis was down has no record: write what the audit saw, so
        # that ebb status says its queues expired, not "unknown job" (found by the chaos run).
        ttl = record.ttl if record is not None and record.ttl is not None else self.settings.max_ttl
        fields = updates.setdefault(job_id, (ttl, {"queues_removed_at": now}))[1]
        delivered = record is not None and record.result_delivered
        if not delivered and kind is QueueKind.RESULT:
            fields["lost"] = lost

    def _handle_unexpiring(self, report: AuditReport, known: set[str], delete: bool) -> None:
        """Queues without any expiry: reported once each (``known``: those reported before, until
        they go), and deleted when unused if ``delete``."""
        unexpiring = [f for f in report.findings if f.state == NO_EXPIRY]
        if unexpiring:
            self._report_unexpiring(unexpiring, delete)
        stale = known - {f.queue for f in unexpiring}
        if stale:
            self.redis.hdel(self.unexpiring_key, *stale)
        if delete:
            self._delete_unused(report, unexpiring)

    def _report_unexpiring(self, unexpiring: list[QueueFinding], delete: bool) -> None:
        """Exactly one auditor wins HSETNX for a queue without expiry and logs it."""
        stamp = repr(time.time())
        won = self._hsetnx_many(
            keys=[self.unexpiring_key], args=[x for f in unexpiring for x in (f.queue, stamp)]
        )
        action = "deleting when unused" if delete else "kept (EBB_AUDIT_DELETE_UNEXPIRING=false)"
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
                    action=action,
                )

    def _delete_unused(self, report: AuditReport, unexpiring: list[QueueFinding]) -> None:
        """Delete the queues without expiry that have no consumer (the broker refuses if one came)."""
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


def _log_found_removed(queue: str, memo: str, record: JobRecord | None) -> None:
    """``orphan_found`` for an orphan the broker removed before it was confirmed: what the memo and
    the record tell, in place of what the listing would have."""
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


def _job_id(queue: str) -> str | None:
    match = QUEUE_NAME_PATTERN.match(queue)
    # Interned: a job's three queues share one string (300,000 queues, 100,000 ids in memory).
    return sys.intern(match["job_id"]) if match else None


def _expiry_from_record(finding: QueueFinding, ttl: str | None) -> None:
    """Without the listing's ``x-expires``: the job's TTL, which its caller declared as the
    queue's ``x-expires`` (the smaller of it and the policy's is what RabbitMQ applies)."""
    try:
        declared = float(ttl) if ttl is not None else None
    except ValueError:
        return
    if declared is not None and (finding.expires_s is None or declared < finding.expires_s):
        finding.expires_s = declared


def _classify(raw: dict[str, Any], policies: ExpiryPolicies) -> QueueFinding:
    name = str(raw["name"])
    arguments = raw.get("arguments")
    expires = arguments.get("x-expires") if isinstance(arguments, dict) else None
    # The expiry RabbitMQ applies: the smaller of x-expires and the policies' (the safety net).
    expires_s, operator = policies.resolve(name, expires / 1000 if isinstance(expires, int | float) else None)
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


def _interned(memos: dict[str, str]) -> dict[str, str]:
    """Memos with their queue names shared with the listing's and equal memos shared (a run
    confirms its orphans with one memo): 300,000 orphans' two hashes took 154 MB as read, 24 MB
    so."""
    return {sys.intern(queue): sys.intern(memo) for queue, memo in memos.items()}


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


@dataclass(frozen=True)
class _Loss:
    """What went with a removed orphan, for its log line and for the metrics alike."""

    kind: QueueKind | None
    result_lost: bool
    messages: int
    text: str


def _what_was_lost(queue: str, memo: str, record: JobRecord | None) -> _Loss:
    parsed = parse_queue_name(queue)
    kind = parsed[1] if parsed else None
    _, _, counted = memo.partition("|")  # the memo: "<first seen unused>|<messages then>"
    messages = int(counted) if counted.isdigit() else 0
    if kind is QueueKind.RESULT:
        if record is not None and record.result_delivered:
            return _Loss(kind, False, 0, "nothing: the result had been delivered")
        if record is not None and record.status in ("SUBMITTED", "RUNNING"):
            text = f"the job's result channel (job was {record.status} when its queues went)"
            return _Loss(kind, True, 0, text)
        return _Loss(kind, True, 0, "result never delivered")
    name = kind.value if kind else "unknown"
    if messages:
        return _Loss(kind, False, messages, f"{messages} undelivered {name} messages")
    return _Loss(kind, False, 0, f"no {name} messages were waiting")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
