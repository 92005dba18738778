"""The checker: a chaos run's history and final state against what Ebb promises.

Transport-free: it reads the JSON-lines history and the final state (job queues left in the
broker, registry records), so it is tested with histories written by hand
(``tests/test_chaos_checker.py``) as well as run at the end of every chaos run.

Invariants (each violation is one line naming the invariant, the job and the evidence):

- ``outcome``: every job a caller was told about (``submit_job`` returned, or an error gave its
  id) has an outcome delivered to a caller, or a registry record saying why not (its queues
  expired or were lost, with the audit's mark; not submitted); none is silently missing.
- ``duplicate``: no process was handed one job's result twice. A result handed again to a
  rescuer after its first receiver was killed is counted apart (at-least-once across processes).
- ``answered``: a caller that lived to its end was answered for every job it held (``wait()``
  returned its result or a final error; ``connect_to_submitted_job`` succeeded or said why not).
- ``bound``: no call took longer than its bound plus ``SLACK``.
- ``foreign_error``: no call raised anything but an ``EbbError``.
- ``ttl``: no job queue of the run is left once its TTL (plus slack) has passed.
- ``audit``: every job whose queues expired unconsumed (no caller was handed its result) was
  reported by the audit (the registry record's ``queues_removed_at``, which the audit writes
  when it logs ``orphan_removed``).
- ``memory``: no long-lived caller's resident memory grew by more than ``MEMORY_GROWTH_KB``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos import history as chaos_history

#: Seconds a call may overrun its bound: process scheduling on a loaded 2-core machine.
SLACK = 5.0
#: How much a caller's RSS may grow from the first to the last third of its samples.
MEMORY_GROWTH_KB = 30_000
#: Samples a caller needs before its memory is judged (one every 5 s).
MEMORY_SAMPLES = 9

CALLS = ("submit", "connect", "disconnect", "wait", "cancel", "status", "client")


@dataclass
class Verdict:
    figures: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        figures = " ".join(f"{k}={_show(v)}" for k, v in self.figures.items())
        return f"chaos: {figures} violations={len(self.violations)}"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{v}" for k, v in sorted(value.items())) + "}"
    return str(value)


def check(events: list[dict[str, Any]], final: dict[str, Any]) -> Verdict:
    verdict = Verdict()
    records: dict[str, dict[str, str]] = final.get("records", {})
    queues_left: list[str] = [q["name"] for q in final.get("queues", [])]
    killed = {
        e["caller"]
        for e in events
        if e["ev"] == "fault_end" and e.get("kind") == "caller_kill" and e.get("caller")
    }

    confirmed = {e["job"] for e in events if e["ev"] == "submit_ok"}
    uncertain = {e["job_id"] for e in events if e["ev"] == "submit_error" and e.get("job_id")} - confirmed
    deliveries: dict[str, Counter[str]] = defaultdict(Counter)
    statuses: dict[str, str] = {}
    for e in events:
        if e["ev"] == "delivered":
            deliveries[e["job"]][e["proc"]] += 1
            statuses[e["job"]] = e["status"]

    _check_calls(events, verdict)
    _check_answered(events, verdict)
    outcomes: Counter[str] = Counter()
    explained: Counter[str] = Counter()
    across = 0
    for job in sorted(confirmed | uncertain):
        receivers = deliveries.get(job, Counter())
        for proc, count in receivers.items():
            if count > 1:
                verdict.violations.append(f"duplicate: job {job} was handed to {proc} {count} times")
        if len(receivers) > 1:
            if len(set(receivers) - killed) > 1:
                verdict.violations.append(
                    f"duplicate: job {job} was handed to {len(set(receivers) - killed)} living callers: "
                    f"{', '.join(sorted(receivers))}"
                )
            else:
                across += 1  # a killed receiver, then its rescuer: at-least-once across processes
        record = records.get(job)
        if receivers:
            outcomes[statuses[job]] += 1
            continue
        why = _why_not(job, record, killed, events)
        if why is None:
            state = (record or {}).get("status", "no record")
            where = "confirmed" if job in confirmed else "uncertain submit"
            verdict.violations.append(
                f"outcome: job {job} ({where}) was never delivered and its record says nothing of why "
                f"(status {state}, queues left: {sum(1 for q in queues_left if job in q)})"
            )
        else:
            explained[why] += 1
    _check_queues(confirmed | uncertain, set(deliveries), records, queues_left, verdict)
    _check_memory(events, killed, verdict)

    # ``skipped`` is on ``fault_end`` (what the injector did), not on ``fault``.
    faults = Counter(e["kind"] for e in events if e["ev"] == "fault_end" and not e.get("skipped"))
    calls = Counter(e["ev"].rsplit("_", 1)[0] for e in events if e["ev"].endswith(("_ok", "_error")))
    verdict.figures = {
        "seed": final.get("seed"),
        "profile": final.get("profile"),
        "broker": final.get("broker"),
        "jobs": len(confirmed | uncertain),
        "confirmed": len(confirmed),
        "uncertain": len(uncertain),
        "delivered": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "explained": dict(explained),
        "redelivered_across_processes": across,
        "faults": dict(faults),
        "calls": sum(calls.values()),
    }
    return verdict


def _why_not(
    job: str, record: dict[str, str] | None, killed: set[str], events: list[dict[str, Any]]
) -> str | None:
    """Why a job has no delivery, when its record (or the caller's end) accounts for it."""
    if record is None:
        return None
    if record.get("status") == "NOT_SUBMITTED":
        return "not_submitted"
    if record.get("lost"):  # the audit's words, short: "result never delivered", ...
        return "expired, " + record["lost"].split(":")[0].split(" (")[0]
    if record.get("queues_removed_at"):
        return "expired"
    if record.get("result_delivered") in ("1", "true", "True") and _held_by_killed(job, killed, events):
        return "delivered_to_killed_caller"
    return None


def _held_by_killed(job: str, killed: set[str], events: list[dict[str, Any]]) -> bool:
    return any(
        e["proc"] in killed and (e.get("job") == job or job in (e.get("rescue") or []))
        for e in events
        if e["ev"] in ("submit_ok", "connect_ok", "caller_start")
    )


def _check_answered(events: list[dict[str, Any]], verdict: Verdict) -> None:
    """A caller that lived to its end got an answer for every job it held: a result or a final error."""
    for e in events:
        if e["ev"] != "caller_done":
            continue
        for job in e.get("waiting") or []:
            verdict.violations.append(
                f"answered: {e['proc']} ended still waiting for job {job} (wait() never returned it)"
            )
        for job in e.get("unconnected") or []:
            verdict.violations.append(f"answered: {e['proc']} ended unable to connect to job {job}")


def _check_calls(events: list[dict[str, Any]], verdict: Verdict) -> None:
    for e in events:
        name, _, outcome = e["ev"].rpartition("_")
        if name not in CALLS or outcome not in ("ok", "error"):
            continue
        bound, job = e.get("bound"), e.get("job") or e.get("job_id")  # an uncertain submit: job_id
        if bound is not None and e.get("elapsed", 0) > bound + SLACK:
            verdict.violations.append(
                f"bound: {e['proc']} {name} of job {job} took {e['elapsed']:.1f} s "
                f"(bound {bound:g} s + {SLACK:g} s slack) at t={e['t']:.1f}"
            )
        if outcome == "error" and not e.get("ebb", True):
            verdict.violations.append(
                f"foreign_error: {e['proc']} {name} of job {job} raised {e.get('error')}: {e.get('message')}"
            )


def _check_queues(
    jobs: set[str], delivered: set[str], records: dict[str, dict[str, str]], left: list[str], verdict: Verdict
) -> None:
    for name in left:
        verdict.violations.append(f"ttl: job queue {name} outlived its TTL")
    for job in sorted(jobs - delivered):  # a delivered job's queues were deleted by its caller
        record = records.get(job) or {}
        if not record or any(job in q for q in left):
            continue
        consumed = record.get("result_delivered") in ("1", "true", "True") or record.get("queues_deleted_at")
        if not consumed and record.get("status") != "NOT_SUBMITTED" and not record.get("queues_removed_at"):
            verdict.violations.append(
                f"audit: job {job}'s queues expired unconsumed (status {record.get('status')}) "
                "and the audit never reported them removed"
            )


def _check_memory(events: list[dict[str, Any]], killed: set[str], verdict: Verdict) -> None:
    samples: dict[str, list[int]] = defaultdict(list)
    for e in events:
        if e["ev"] == "memory" and e["proc"] not in killed:
            samples[e["proc"]].append(int(e["rss_kb"]))
    for proc, rss in samples.items():
        if len(rss) < MEMORY_SAMPLES:
            continue
        third = len(rss) // 3
        first, last = statistics.median(rss[1 : third + 1]), statistics.median(rss[-third:])
        if last - first > MEMORY_GROWTH_KB:
            verdict.violations.append(
                f"memory: {proc} grew from {first / 1024:.0f} MB to {last / 1024:.0f} MB "
                f"over {len(rss)} samples"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a chaos run's history against its final state.")
    parser.add_argument("history", type=Path)
    parser.add_argument("final", type=Path)
    args = parser.parse_args(argv)
    final = json.loads(args.final.read_text())
    verdict = check(chaos_history.read(args.history), final)
    for violation in verdict.violations:
        print(f"violation: {violation}")
    print(verdict.line())
    if verdict.violations:
        print(
            f"replay: python -m tests.chaos.run --profile {final.get('profile')} --seed {final.get('seed')}"
        )
    return 1 if verdict.violations else 0


if __name__ == "__main__":
    sys.exit(main())
