"""The plumbing the benches share, kept in one place so that the copies cannot drift apart.

``bench_jobs.py``, ``bench_burst.py``, ``bench_toggles.py`` and ``broker_breakdown.py`` each
start Celery workers, must survive Ctrl-C without stranding queues on the broker, and report
on the same broker the same way. What they do alike lives here:

- ``progress``: a ``say`` that writes tagged progress lines to stderr (stdout is the report);
- ``Interrupts`` and its one instance ``INTERRUPTS``: Ctrl-C and SIGTERM held off while a job
  is submitted but not yet recorded, or a worker half stopped;
- ``worker`` and ``stop_worker``: a Celery worker in its own session, always stopped, whose pid
  is ``CURRENT_WORKER`` for the CPU groups of ``meter_for``;
- ``delete_from_broker``, ``leftover_queues`` and ``leftover_line``: the clean-up of a run's
  queues, and the check on the management API (and its line in the report) that nothing is left;
- ``broker_meta`` and ``remove_logs``: the broker and machine part of a report, and the removal
  of the worker logs of a run that went well.

What a bench measures, and how it reports it, stays in that bench.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import requests
from kombu.connection import Connection

from bench.cpu import Target, by_session
from ebb import Settings, contract

#: The repository root: workers start there, where ``tasks`` and ``bench`` live.
ROOT = Path(__file__).resolve().parents[1]
WORKER_FLAGS = ("-c", "2", "-P", "prefork", "--without-gossip", "--without-mingle", "--without-heartbeat")
#: The worker of the measurement under way (its session: it and its pool), for the CPU meter.
CURRENT_WORKER: list[int | None] = [None]

Say = Callable[[str], None]


def progress(tag: str) -> Say:
    """A ``say`` for one bench: ``[tag] message`` lines on stderr."""

    def say(message: str) -> None:
        """Progress goes to stderr so that stdout stays the table (or the JSON)."""
        print(f"[{tag}] {message}", file=sys.stderr, flush=True)

    return say


class Interrupts:
    """Ctrl-C and SIGTERM raise ``KeyboardInterrupt``, but not inside ``with INTERRUPTS:``.

    There they wait for the block to end, so that a job is never left submitted but untracked
    (its queues would outlive the run) and a worker is never left half stopped.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started ignoring it
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def meter_for(measured: Target) -> dict[str, Callable[[], list[int]]]:
    """The CPU groups: the beam.smp and redis-server listening on the ports the bench uses."""
    return {
        "rabbitmq": measured.rabbitmq,
        "worker": by_session(lambda: CURRENT_WORKER[0]),
        "client": lambda: [os.getpid()],
        "redis": measured.redis,
    }


@contextlib.contextmanager
def worker(
    app: str, node: str, env: dict[str, str], log: Path, say: Say, extra: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """A Celery worker of ``app`` named ``node`` (``-n``) in its own session (Ctrl-C reaches only
    the bench), ``CURRENT_WORKER`` while it runs, always stopped on exit."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", *WORKER_FLAGS, "-n", node, *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    say(f"started worker pid {proc.pid}: {' '.join(command[1:])} (log {log})")
    CURRENT_WORKER[0] = proc.pid
    try:
        yield proc
    finally:
        CURRENT_WORKER[0] = None
        stop_worker(proc, say)


def stop_worker(proc: subprocess.Popen[bytes], say: Say) -> None:
    """Warm shutdown first; if it hangs, kill the worker's own process group (it and its pool)."""
    with INTERRUPTS:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the unreaped leader keeps this group id ours
                proc.wait()
        say(f"worker pid {proc.pid} stopped (exit code {proc.returncode})")


def delete_from_broker(broker_url: str, queues: Iterable[str], exchanges: Iterable[str]) -> None:
    """Delete these queues, then these exchanges, on one connection (a name already gone is fine)."""
    with Connection(broker_url, connect_timeout=10) as connection:
        channel = connection.channel()
        for name in queues:
            channel.queue_delete(name)  # idempotent: a queue already gone is fine
        for name in exchanges:
            channel.exchange_delete(name)


def leftover_queues(
    settings: Settings,
    management_url: str,
    queues: Collection[str],
    job_ids: Collection[uuid.UUID],
    timeout: float,
) -> tuple[int, int]:
    """(queues of this run that still exist: named in ``queues`` or of a job in ``job_ids``,
    other ``jobs.*`` queues: not this run's, e.g. other people's tests), from the management API."""
    response = requests.get(
        f"{management_url}/api/queues/{quote(settings.vhost, safe='')}",
        params={"columns": "name"},
        auth=(settings.management_user, settings.management_password),
        timeout=timeout,
    )
    response.raise_for_status()
    ours = others = 0
    for queue in response.json():
        name = str(queue["name"])
        parsed = contract.parse_queue_name(name)
        if name in queues or (parsed is not None and parsed[0] in job_ids):
            ours += 1
        elif parsed is not None:
            others += 1
    return ours, others


def leftover_line(ours: int, others: int) -> str:
    """The report's line on what ``leftover_queues`` found."""
    return (
        f"leftover queues of this run: {ours}; other jobs.* queues on the broker (not this run's): {others}"
    )


def broker_meta(measured: Target, load_before: float) -> dict[str, Any]:
    """The head of a report's ``meta``: the broker measured, the cores, the load around the run."""
    return {
        "rabbitmq": measured.version,
        "broker": measured.to_dict(),
        "broker_described": measured.describe(),
        "cores": os.cpu_count(),
        # Other processes (test workers, say) compete for the same cores: a high load means noise.
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }


def remove_logs(logs: Path) -> None:
    """Remove a run's log directory (its worker logs): kept only when the run failed."""
    for path in logs.iterdir():
        path.unlink()
    logs.rmdir()
