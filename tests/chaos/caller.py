"""One caller process of a chaos run, with either client: submits, cancels, rescues, waits.

``python -m tests.chaos.caller --client sync|async --proc caller-1 --seed 7 --history H --until T
[--rescue ID,ID...]``. Its choices (what to submit, when, what to cancel) come from the seed and
its name, so a replay makes the same calls. It first rescues the job ids it was handed (those
of a caller that was killed), then submits until ``--until``, then waits for everything it holds.
Every call is written to the history with its bound and how long it took; every result handed
to ``on_finished`` is a ``delivered`` event. A call that fails with the broker or Redis out of
reach is tried again, as a careful caller would; any other error is the run's finding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ebb import (
    ClientClosedError,
    EbbError,
    Job,
    JobClient,
    JobQueuesExpiredError,
    JobResult,
    UnavailableError,
    UnknownJobError,
)
from ebb.aio import AsyncJobClient
from ebb.config import Settings
from tests.chaos.history import History

T = TypeVar("T")
#: Slack on top of a call's own bound: process scheduling on a loaded 2-core machine.
SLACK = 5.0
#: How long the wait phase may take in all, past ``--until`` (then the run's checker judges).
WAIT_PHASE = 240.0
#: A result never waited for longer than this in one call (a rescue continues with a new one).
WAIT_CALL = 30.0
#: Whether a failure is the broker or Redis out of reach: try again later, as a caller would.
RETRYABLE = (UnavailableError, ClientClosedError)
#: Between rounds of connects that could not be made yet (a careful caller does not spin).
RETRY_PAUSE = 0.5


class Plan:
    """The caller's seeded choices; shared by both clients so that they make the same calls."""

    def __init__(self, seed: int, proc: str) -> None:
        self.rng = random.Random(f"{seed}:{proc}")

    def gap(self) -> float:
        return self.rng.uniform(0.3, 1.5)

    def job(self) -> tuple[str, dict[str, Any], bool]:
        """(workflow, params, updates): mostly short sleeps with progress, some echoes."""
        if self.rng.random() < 0.3:
            return "demo.echo", {"n": self.rng.randrange(1000)}, False
        seconds = round(self.rng.uniform(0.2, 4.0), 2)
        return "demo.sleep", {"seconds": seconds, "steps": self.rng.randrange(1, 5)}, self.rng.random() < 0.5

    def cancel_after(self) -> float | None:
        """Seconds after its submit to cancel a job (queued or running), or None (most jobs)."""
        return round(self.rng.uniform(0.0, 3.0), 2) if self.rng.random() < 0.12 else None

    def abandon(self) -> bool:
        """A caller that never comes back for a job (disconnects, keeps its queues): the audit's case."""
        return self.rng.random() < 0.05

    def look_at_status(self) -> bool:
        return self.rng.random() < 0.2


def bounds(settings: Settings) -> dict[str, float]:
    """Each call's documented bound, as the checker will hold it to (plus SLACK)."""
    broker, registry = settings.broker_timeout, 5.0
    return {
        # the catalog read and the record write (Redis), the declares and the confirm (broker)
        "submit": broker + 2 * registry,
        # a probe per queue kind, each bounded by min(5 s, broker), then the record write
        "connect": broker + 5.0 + 2 * registry,
        "cancel": 2 * registry,
        "disconnect": broker + registry,
        "status": registry,
        "client": broker + 10.0,
    }


class Recorder:
    """Writes the calls of one process, with elapsed time and bound, and its deliveries."""

    def __init__(self, history: History, settings: Settings) -> None:
        self.h = history
        self.bounds = bounds(settings)

    def on_finished(self, job: Job, result: JobResult) -> None:
        self.h.record("delivered", job=str(job.id), status=result.status.value, attempt=result.attempt)

    def begin(self, call: str, job: uuid.UUID | str | None = None, **fields: Any) -> float:
        bound = fields.pop("bound", self.bounds.get(call))
        self.h.record(f"{call}_start", job=str(job) if job else None, bound=bound, **fields)
        return time.monotonic()

    def ok(self, call: str, started: float, job: uuid.UUID | str | None, **fields: Any) -> None:
        self.h.record(
            f"{call}_ok",
            job=str(job) if job else None,
            elapsed=round(time.monotonic() - started, 3),
            bound=fields.pop("bound", self.bounds.get(call)),
            **fields,
        )

    def error(
        self, call: str, started: float, job: uuid.UUID | str | None, exc: BaseException, **fields: Any
    ) -> None:
        self.h.record(
            f"{call}_error",
            job=str(job) if job else None,
            elapsed=round(time.monotonic() - started, 3),
            bound=fields.pop("bound", self.bounds.get(call)),
            error=type(exc).__name__,
            ebb=isinstance(exc, EbbError),
            retryable=isinstance(exc, RETRYABLE),
            job_id=str(getattr(exc, "job_id", None) or "") or None,
            message=str(exc)[:300],
            **fields,
        )


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class State:
    """What this caller holds: jobs to wait for, jobs to (re)connect to, cancels due."""

    def __init__(self, rescue: list[str]) -> None:
        self.waiting: dict[str, float] = {}  # job id -> when it was submitted or connected
        self.to_connect: list[str] = list(rescue)
        self.cancels: list[tuple[float, str]] = []
        self.finished: set[str] = set()
        self.next_sample = 0.0

    # What a careful caller does with each answer: one place, for both clients' drivers.

    def connected(self, job_id: str, ok: bool, history: History) -> None:
        if ok:
            self.to_connect.remove(job_id)
            self.waiting[job_id] = time.time()
        elif _last_error_final(history):
            self.to_connect.remove(job_id)

    def submitted(self, job_id: str, cancel_after: float | None) -> None:
        self.waiting[job_id] = time.time()
        if cancel_after is not None:
            self.cancels.append((time.time() + cancel_after, job_id))

    def submit_failed(self, history: History) -> None:
        uncertain = _last_job_id(history)
        if uncertain:  # the task may have gone out: find out, as the error says
            self.to_connect.append(uncertain)

    def waited(self, job_id: str, ok: bool, history: History) -> bool:
        """Settle a wait's answer; True when the client gave up on the broker: open a new one."""
        if ok or _last_error_final(history):
            del self.waiting[job_id]
        elif _last_error_is(history, "JobQueuesUnavailableError"):  # as the error says:
            del self.waiting[job_id]  # connect again once the node is back
            self.to_connect.append(job_id)
        elif _last_error_is(history, "ClientClosedError"):
            return True
        return False


# --- the sync client -------------------------------------------------------------------------


def run_sync(args: argparse.Namespace, history: History) -> None:
    settings = Settings.from_env()
    rec, plan, state = Recorder(history, settings), Plan(args.seed, args.proc), State(args.rescue)
    client = _new_sync_client(rec, settings, args.until + WAIT_PHASE)

    def call(name: str, job: str | None, fn: Callable[[], T], **fields: Any) -> tuple[bool, T | None]:
        started = rec.begin(name, job, **fields)
        try:
            value = fn()
        except Exception as exc:
            rec.error(name, started, job, exc, **fields)
            return False, None
        rec.ok(name, started, job if job else getattr(value, "id", None), **fields)
        return True, value

    def connect_pending() -> None:
        for job_id in list(state.to_connect):
            ok, _ = call(
                "connect",
                job_id,
                partial(client.connect_to_submitted_job, job_id, on_finished=rec.on_finished),
            )
            state.connected(job_id, ok, history)

    def housekeeping() -> None:
        now = time.time()
        for due, job_id in [c for c in state.cancels if c[0] <= now]:
            state.cancels.remove((due, job_id))
            call("cancel", job_id, partial(client.cancel_job, job_id))
        if now >= state.next_sample:
            history.record("memory", rss_kb=rss_kb())
            state.next_sample = now + 5

    connect_pending()
    while time.time() < args.until:
        workflow, params, updates = plan.job()
        cancel_after = plan.cancel_after()
        ok, job = call(
            "submit",
            None,
            partial(
                client.submit_job,
                workflow,
                params,
                on_finished=rec.on_finished,
                updates=updates,
                auto_cleanup_after_ttl=args.ttl,
            ),
            workflow=workflow,
        )
        abandon = plan.abandon()
        if ok and job is not None and abandon:
            call(
                "disconnect",
                str(job.id),
                partial(client.disconnect_from_submitted_job, job, delete_queues=False),
            )
        elif ok and job is not None:
            state.submitted(str(job.id), cancel_after)
            if plan.look_at_status():
                call("status", str(job.id), partial(client.job_status, job))
        else:
            state.submit_failed(history)
        housekeeping()
        time.sleep(plan.gap())
        housekeeping()
        connect_pending()

    deadline = args.until + WAIT_PHASE
    while (state.waiting or state.to_connect) and time.time() < deadline:
        housekeeping()
        connect_pending()
        for job_id in list(state.waiting):
            ok, _ = call("wait", job_id, partial(client.wait, job_id, timeout=WAIT_CALL), bound=WAIT_CALL + 5)
            if state.waited(job_id, ok, history):
                client = _reopen_sync(client, rec, settings, deadline, state)
                break
        if not state.waiting:  # only jobs to connect to, their node or the broker still away
            time.sleep(RETRY_PAUSE)
    history.record("caller_done", waiting=sorted(state.waiting), unconnected=sorted(state.to_connect))
    history.record("memory", rss_kb=rss_kb())
    client.close()


def _new_sync_client(rec: Recorder, settings: Settings, deadline: float) -> JobClient:
    while True:
        started = rec.begin("client")
        try:
            client = JobClient(settings=settings)
        except Exception as exc:
            rec.error("client", started, None, exc)
            if time.time() > deadline:
                raise
            time.sleep(1)
            continue
        rec.ok("client", started, None)
        return client


def _reopen_sync(
    client: JobClient, rec: Recorder, settings: Settings, deadline: float, state: State
) -> JobClient:
    """A client that gave up on its connection: a new one, which reconnects to every job held."""
    with contextlib.suppress(EbbError):
        client.close()
    state.to_connect.extend(state.waiting)
    state.waiting.clear()
    return _new_sync_client(rec, settings, deadline)


# --- the asyncio client ------------------------------------------------------------------------


async def run_async(args: argparse.Namespace, history: History) -> None:
    settings = Settings.from_env()
    rec, plan, state = Recorder(history, settings), Plan(args.seed, args.proc), State(args.rescue)
    client = await _new_async_client(rec, settings, args.until + WAIT_PHASE)

    async def call(
        name: str, job: str | None, fn: Callable[[], Awaitable[T]], **fields: Any
    ) -> tuple[bool, T | None]:
        started = rec.begin(name, job, **fields)
        try:
            value = await fn()
        except Exception as exc:
            rec.error(name, started, job, exc, **fields)
            return False, None
        rec.ok(name, started, job if job else getattr(value, "id", None), **fields)
        return True, value

    async def connect_pending() -> None:
        for job_id in list(state.to_connect):
            ok, _ = await call(
                "connect",
                job_id,
                partial(client.connect_to_submitted_job, job_id, on_finished=rec.on_finished),
            )
            state.connected(job_id, ok, history)

    async def housekeeping() -> None:
        now = time.time()
        for due, job_id in [c for c in state.cancels if c[0] <= now]:
            state.cancels.remove((due, job_id))
            await call("cancel", job_id, partial(client.cancel_job, job_id))
        if now >= state.next_sample:
            history.record("memory", rss_kb=rss_kb())
            state.next_sample = now + 5

    await connect_pending()
    while time.time() < args.until:
        workflow, params, updates = plan.job()
        cancel_after = plan.cancel_after()
        ok, job = await call(
            "submit",
            None,
            partial(
                client.submit_job,
                workflow,
                params,
                on_finished=rec.on_finished,
                updates=updates,
                auto_cleanup_after_ttl=args.ttl,
            ),
            workflow=workflow,
        )
        abandon = plan.abandon()
        if ok and job is not None and abandon:
            await call(
                "disconnect",
                str(job.id),
                partial(client.disconnect_from_submitted_job, job, delete_queues=False),
            )
        elif ok and job is not None:
            state.submitted(str(job.id), cancel_after)
            if plan.look_at_status():
                await call("status", str(job.id), partial(client.job_status, job))
        else:
            state.submit_failed(history)
        await housekeeping()
        await asyncio.sleep(plan.gap())
        await housekeeping()
        await connect_pending()

    deadline = args.until + WAIT_PHASE
    while (state.waiting or state.to_connect) and time.time() < deadline:
        await housekeeping()
        await connect_pending()
        for job_id in list(state.waiting):
            ok, _ = await call(
                "wait", job_id, partial(client.wait, job_id, timeout=WAIT_CALL), bound=WAIT_CALL + 5
            )
            if state.waited(job_id, ok, history):
                client = await _reopen_async(client, rec, settings, deadline, state)
                break
        if not state.waiting:  # only jobs to connect to, their node or the broker still away
            await asyncio.sleep(RETRY_PAUSE)
    history.record("caller_done", waiting=sorted(state.waiting), unconnected=sorted(state.to_connect))
    history.record("memory", rss_kb=rss_kb())
    await client.close()


async def _new_async_client(rec: Recorder, settings: Settings, deadline: float) -> AsyncJobClient:
    while True:
        started = rec.begin("client")
        client = AsyncJobClient(settings=settings)
        try:
            await client.start()
        except Exception as exc:
            rec.error("client", started, None, exc)
            await client.close()
            if time.time() > deadline:
                raise
            await asyncio.sleep(1)
            continue
        rec.ok("client", started, None)
        return client


async def _reopen_async(
    client: AsyncJobClient, rec: Recorder, settings: Settings, deadline: float, state: State
) -> AsyncJobClient:
    with contextlib.suppress(EbbError):
        await client.close()
    state.to_connect.extend(state.waiting)
    state.waiting.clear()
    return await _new_async_client(rec, settings, deadline)


# --- what the last recorded error said ---------------------------------------------------------
#
# The call helpers record errors and return False; these read that record back through the
# History object, which remembers the last error it wrote (no second channel to keep in sync).


def _last(history: History) -> dict[str, Any]:
    return history.last_error or {}


def _last_job_id(history: History) -> str | None:
    job_id = _last(history).get("job_id")
    return str(job_id) if job_id else None


def _last_error_is(history: History, name: str) -> bool:
    return _last(history).get("error") == name


def _last_error_final(history: History) -> bool:
    """An answer that will not change by asking again: the job's queues are gone, or unknown."""
    return _last(history).get("error") in (JobQueuesExpiredError.__name__, UnknownJobError.__name__) or (
        not _last(history).get("retryable", True) and _last(history).get("error") != "WaitTimeoutError"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=("sync", "async"), required=True)
    parser.add_argument("--proc", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--until", type=float, required=True)
    parser.add_argument("--ttl", type=float, default=60.0)
    parser.add_argument("--rescue", type=lambda s: [x for x in s.split(",") if x], default=[])
    args = parser.parse_args()
    history = History(args.history, args.proc)
    history.record("caller_start", client=args.client, rescue=args.rescue)
    if args.client == "sync":
        run_sync(args, history)
    else:
        asyncio.run(run_async(args, history))


if __name__ == "__main__":
    main()
