"""The chaos checker and schedule, without a broker: histories written by hand.

A chaos run is only as good as its checker: each invariant is shown to pass a clean history
and to name exactly the job a broken one breaks, so a quiet run means something.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import checker
from tests.chaos.checker import SLACK, Verdict, check
from tests.chaos.schedule import PROFILES, Profile, plan

J1 = "3f0c5f3e-6a9f-4a43-9c1f-0d6b7f8a1c01"
J2 = "8e2a1b44-0c7d-4f5e-a1b2-c3d4e5f60702"
SUBMIT_BOUND = 25.0

Event = dict[str, Any]


def ev(t: float, proc: str, name: str, **fields: Any) -> Event:
    """One history line, as ``History.record`` writes it."""
    return {"t": 1_700_000_000.0 + t, "proc": proc, "pid": 1000 + sum(map(ord, proc)), "ev": name, **fields}


def submitted(proc: str, job: str, t: float = 1.0, elapsed: float = 0.4) -> list[Event]:
    return [
        ev(t, proc, "submit_start", job=None, bound=SUBMIT_BOUND, workflow="demo.echo"),
        ev(
            t + elapsed, proc, "submit_ok", job=job, elapsed=elapsed, bound=SUBMIT_BOUND, workflow="demo.echo"
        ),
    ]


def failed(t: float, proc: str, call: str, job: str | None, error: str, **fields: Any) -> Event:
    """A ``*_error`` line as the Recorder writes it (an Ebb error, retryable, unless told)."""
    line = {"elapsed": 0.4, "bound": SUBMIT_BOUND, "ebb": True, "retryable": True, "job_id": None, **fields}
    return ev(t, proc, f"{call}_error", job=job, error=error, message=f"{error}: chaos", **line)


def delivered(proc: str, job: str, t: float = 3.0, status: str = "SUCCESS") -> Event:
    return ev(t, proc, "delivered", job=job, status=status, attempt=1)


def killed(proc: str, rescuer: str, t: float = 5.0, jobs: int = 1) -> list[Event]:
    """A caller_kill fault: the victim's jobs handed to a rescuer started with their ids."""
    return [
        ev(t, "harness", "fault", kind="caller_kill", at=t, pick=7, hold=3.0),
        ev(t + 0.2, "harness", "fault_end", kind="caller_kill", caller=proc, rescuer=rescuer, jobs=jobs),
    ]


def consumed() -> dict[str, str]:
    """A registry record of a job whose result was received and whose queues were deleted."""
    return {"status": "SUCCESS", "result_delivered": "1", "queues_deleted_at": "1700000004.1"}


def final(records: dict[str, dict[str, str]], queues: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "seed": 4242,
        "profile": "short",
        "broker": "3.10.8",
        "queues": [
            {"name": q, "arguments": {}, "consumers": 0, "messages": 1, "node": "rabbit@x"} for q in queues
        ],
        "records": records,
    }


def clean_history() -> list[Event]:
    return [
        ev(0.0, "caller-1", "caller_start", client="sync", rescue=[]),
        *submitted("caller-1", J1),
        ev(1.5, "caller-1", "status_start", job=J1, bound=5.0),
        ev(1.6, "caller-1", "status_ok", job=J1, elapsed=0.1, bound=5.0),
        delivered("caller-1", J1),
        ev(3.1, "caller-1", "wait_start", job=J1, bound=35.0),
        ev(3.2, "caller-1", "wait_ok", job=J1, elapsed=0.1, bound=35.0),
        ev(3.3, "caller-1", "caller_done", waiting=[], unconnected=[]),
    ]


def of(verdict: Verdict, invariant: str) -> list[str]:
    return [v for v in verdict.violations if v.startswith(f"{invariant}:")]


def invariants(verdict: Verdict) -> list[str]:
    return [v.split(":", 1)[0] for v in verdict.violations]


# --- outcome ---------------------------------------------------------------------------------


def test_outcome_clean_history_passes() -> None:
    verdict = check(clean_history(), final({J1: consumed()}))
    assert verdict.violations == []
    assert verdict.figures["jobs"] == 1
    assert verdict.figures["delivered"] == 1
    assert verdict.figures["outcomes"] == {"SUCCESS": 1}


def test_outcome_confirmed_job_never_delivered_is_a_violation() -> None:
    events = [ev(0.0, "caller-1", "caller_start", client="sync", rescue=[]), *submitted("caller-1", J1)]
    verdict = check(events, final({J1: {"status": "SUBMITTED", "result_delivered": "0"}}))
    (violation,) = of(verdict, "outcome")
    assert J1 in violation and "confirmed" in violation and "SUBMITTED" in violation
    # The same silence is the audit's too: nothing consumed, nothing reported removed.
    assert invariants(verdict) == ["outcome", "audit"]


def test_outcome_expired_queues_explain_a_missing_result() -> None:
    record = {"status": "SUBMITTED", "result_delivered": "0", "queues_removed_at": "1700000060.0"}
    verdict = check(submitted("caller-1", J1), final({J1: record}))
    assert verdict.violations == []
    assert verdict.figures["explained"] == {"expired": 1}


def test_outcome_not_submitted_explains_an_uncertain_submit() -> None:
    events = [
        ev(1.0, "caller-1", "submit_start", job=None, bound=SUBMIT_BOUND, workflow="demo.echo"),
        failed(2.0, "caller-1", "submit", None, "BrokerUnavailableError", elapsed=1.0, job_id=J1),
    ]
    verdict = check(events, final({J1: {"status": "NOT_SUBMITTED"}}))
    assert verdict.violations == []
    assert verdict.figures["uncertain"] == 1
    assert verdict.figures["explained"] == {"not_submitted": 1}

    unexplained = check(events, final({J1: {"status": "SUBMITTED", "queues_deleted_at": "1700000009.0"}}))
    (violation,) = unexplained.violations
    assert violation.startswith("outcome:") and J1 in violation and "uncertain submit" in violation


def test_outcome_result_taken_by_a_killed_caller_is_explained() -> None:
    events = [
        ev(0.0, "caller-1", "caller_start", client="sync", rescue=[]),
        *submitted("caller-1", J1),
        *killed("caller-1", "rescuer-5"),
        ev(6.0, "rescuer-5", "caller_start", client="sync", rescue=[J1]),
        ev(6.1, "rescuer-5", "connect_start", job=J1, bound=25.0),
        failed(6.5, "rescuer-5", "connect", J1, "JobQueuesExpiredError", retryable=False, job_id=J1),
    ]
    verdict = check(events, final({J1: consumed()}))
    assert verdict.violations == []
    assert verdict.figures["explained"] == {"delivered_to_killed_caller": 1}

    # The same record with a living submitter explains nothing: the caller lost it.
    living = [e for e in events if e["ev"] not in ("fault", "fault_end")]
    (violation,) = check(living, final({J1: consumed()})).violations
    assert violation.startswith("outcome:") and J1 in violation


# --- duplicate -------------------------------------------------------------------------------


def test_duplicate_one_process_handed_a_result_twice() -> None:
    events = [*clean_history(), delivered("caller-1", J1, t=4.0)]
    (violation,) = check(events, final({J1: consumed()})).violations
    assert violation.startswith("duplicate:") and J1 in violation and "caller-1 2 times" in violation


def test_duplicate_killed_caller_then_its_rescuer_is_counted_not_flagged() -> None:
    events = [
        *submitted("caller-1", J1),
        delivered("caller-1", J1, t=2.0),
        *killed("caller-1", "rescuer-5"),
        ev(6.0, "rescuer-5", "caller_start", client="async", rescue=[J1]),
        ev(6.5, "rescuer-5", "connect_ok", job=J1, elapsed=0.4, bound=25.0),
        delivered("rescuer-5", J1, t=7.0),
    ]
    verdict = check(events, final({J1: consumed()}))
    assert verdict.violations == []
    assert verdict.figures["redelivered_across_processes"] == 1


def test_duplicate_two_living_callers() -> None:
    events = [
        *submitted("caller-1", J1),
        delivered("caller-1", J1, t=2.0),
        ev(2.5, "caller-2", "connect_ok", job=J1, elapsed=0.4, bound=25.0),
        delivered("caller-2", J1, t=3.0),
    ]
    verdict = check(events, final({J1: consumed()}))
    (violation,) = verdict.violations
    assert violation.startswith("duplicate:") and J1 in violation and "2 living callers" in violation
    assert verdict.figures["redelivered_across_processes"] == 0


# --- bound -----------------------------------------------------------------------------------


def test_bound_within_the_slack_passes() -> None:
    events = [
        *submitted("caller-1", J1, elapsed=SUBMIT_BOUND + SLACK - 0.1),
        delivered("caller-1", J1, t=40.0),
    ]
    assert check(events, final({J1: consumed()})).violations == []


def test_bound_overrun_is_a_violation() -> None:
    events = [
        *submitted("caller-1", J1, elapsed=SUBMIT_BOUND + SLACK + 0.5),
        delivered("caller-1", J1, t=40.0),
    ]
    (violation,) = check(events, final({J1: consumed()})).violations
    assert violation.startswith("bound:") and f"submit of job {J1}" in violation


def test_bound_overrun_of_an_uncertain_submit_names_its_job() -> None:
    events = [
        failed(
            40.0,
            "caller-1",
            "submit",
            None,
            "BrokerUnavailableError",
            elapsed=SUBMIT_BOUND + SLACK + 1,
            job_id=J1,
        ),
    ]
    (violation,) = check(events, final({J1: {"status": "NOT_SUBMITTED"}})).violations
    assert violation.startswith("bound:") and J1 in violation


# --- foreign_error ---------------------------------------------------------------------------


def test_foreign_error_is_a_violation_an_ebb_error_is_not() -> None:
    ebb_error = [
        *clean_history(),
        failed(2.0, "caller-1", "status", J1, "RegistryUnavailableError", bound=5.0),
    ]
    assert check(ebb_error, final({J1: consumed()})).violations == []

    foreign = [*clean_history(), failed(2.0, "caller-1", "status", J1, "ConnectionResetError", ebb=False)]
    (violation,) = check(foreign, final({J1: consumed()})).violations
    assert violation.startswith("foreign_error:") and J1 in violation and "ConnectionResetError" in violation


# --- ttl -------------------------------------------------------------------------------------


def test_ttl_job_queue_left_is_a_violation() -> None:
    assert check(clean_history(), final({J1: consumed()})).violations == []
    verdict = check(clean_history(), final({J1: consumed()}, queues=(f"jobs.{J1}.result",)))
    (violation,) = verdict.violations
    assert violation.startswith("ttl:") and f"jobs.{J1}.result" in violation


# --- audit -----------------------------------------------------------------------------------


def test_audit_expired_queues_never_reported_is_a_violation() -> None:
    # The worker found the result queue gone and said so; the audit never logged orphan_removed.
    dropped = {"status": "SUCCESS", "lost": "result dropped: its queue had expired before the job ended"}
    reported = {**dropped, "queues_removed_at": "1700000070.0"}

    verdict = check(submitted("caller-1", J1), final({J1: reported}))
    assert verdict.violations == []
    assert verdict.figures["explained"] == {"expired, result dropped": 1}

    (violation,) = check(submitted("caller-1", J1), final({J1: dropped})).violations
    assert violation.startswith("audit:") and J1 in violation


# --- memory ----------------------------------------------------------------------------------


def samples(proc: str, rss_kb: list[int]) -> list[Event]:
    return [ev(10.0 + 5 * i, proc, "memory", rss_kb=kb) for i, kb in enumerate(rss_kb)]


def growing() -> list[int]:
    """Twelve samples, 100 MB to 150 MB: a leak."""
    return [100 * 1024 + round(50 * 1024 * i / 11) for i in range(12)]


def test_memory_growth_is_a_violation() -> None:
    (violation,) = check(
        [*clean_history(), *samples("caller-1", growing())], final({J1: consumed()})
    ).violations
    assert violation.startswith("memory:") and "caller-1" in violation


def test_memory_flat_passes() -> None:
    flat = samples("caller-1", [100 * 1024 + (i % 3) * 512 for i in range(12)])
    assert check([*clean_history(), *flat], final({J1: consumed()})).violations == []


def test_memory_of_a_killed_caller_is_ignored() -> None:
    events = [*samples("caller-2", growing()), *killed("caller-2", "rescuer-5", t=70.0, jobs=0)]
    assert check([*clean_history(), *events], final({J1: consumed()})).violations == []


# --- the schedule ----------------------------------------------------------------------------


def test_plan_same_seed_same_faults_other_seed_other_faults() -> None:
    short = PROFILES["short"]
    assert plan(7, short) == plan(7, short)
    assert plan(7, short) != plan(8, short)


@pytest.mark.parametrize("profile", [PROFILES["short"], PROFILES["long"]], ids=lambda p: p.name)
def test_plan_every_kind_at_least_once_all_within_the_duration(profile: Profile) -> None:
    for seed in range(200):
        faults = plan(seed, profile)
        assert set(profile.faults) <= {f.kind for f in faults}, seed
        assert all(0 < f.at < profile.duration for f in faults), seed
        assert [f.at for f in faults] == sorted(f.at for f in faults), seed


# --- the figure line and the command ---------------------------------------------------------


def test_figure_line() -> None:
    events = [*clean_history(), *killed("caller-2", "rescuer-5", t=8.0, jobs=0)]
    skipped = [
        ev(9.0, "harness", "fault", kind="pool_kill", at=9.0, pick=1, hold=2.0),
        ev(9.1, "harness", "fault_end", kind="pool_kill", skipped="no live worker"),
    ]
    verdict = check([*events, *skipped], final({J1: consumed()}, queues=(f"jobs.{J1}.progress",)))
    line = verdict.line()
    assert line.startswith("chaos: ")
    assert "seed=4242" in line and "jobs=1" in line
    assert "faults={caller_kill:1}" in line  # the skipped pool_kill did nothing
    assert line.endswith("violations=1")


def write_run(tmp_path: Path, events: list[Event], state: dict[str, Any]) -> list[str]:
    history, final_json = tmp_path / "history.jsonl", tmp_path / "final.json"
    history.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"t": 1, "torn')
    final_json.write_text(json.dumps(state))
    return [str(history), str(final_json)]


def test_main_exits_0_on_a_clean_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert checker.main(write_run(tmp_path, clean_history(), final({J1: consumed()}))) == 0
    out = capsys.readouterr().out
    assert "violations=0" in out and "replay:" not in out


def test_main_exits_1_and_names_the_seed_to_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [*clean_history(), delivered("caller-1", J1, t=4.0)]
    assert checker.main(write_run(tmp_path, events, final({J1: consumed()}))) == 1
    out = capsys.readouterr().out
    assert f"violation: duplicate: job {J1}" in out
    assert "replay: python -m tests.chaos.run --profile short --seed 4242" in out


def test_answered_a_caller_that_ends_still_waiting_is_a_violation() -> None:
    job = str(uuid.uuid4())
    events = [
        {"t": 1.0, "proc": "caller-1", "pid": 1, "ev": "submit_ok", "job": job, "elapsed": 0.1, "bound": 15},
        {
            "t": 2.0,
            "proc": "caller-1",
            "pid": 1,
            "ev": "delivered",
            "job": job,
            "status": "SUCCEEDED",
            "attempt": 1,
        },
        {"t": 9.0, "proc": "caller-1", "pid": 1, "ev": "caller_done", "waiting": [job], "unconnected": []},
    ]
    final = {
        "seed": 1,
        "profile": "short",
        "broker": "x",
        "queues": [],
        "records": {job: {"status": "SUCCEEDED"}},
    }
    verdict = checker.check(events, final)
    assert [v for v in verdict.violations if v.startswith("answered:")] == [
        f"answered: caller-1 ended still waiting for job {job} (wait() never returned it)"
    ]
    events[-1]["waiting"] = []
    assert not [v for v in checker.check(events, final).violations if v.startswith("answered:")]
