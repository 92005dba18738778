"""What each step of a three-queue job costs RabbitMQ: each toggle on and off, in one sitting.

For every toggle this runs rounds in ABBA order (off, on, on, off: a drift of the machine over
the run weighs on both alike), each with a fresh worker (``bench.toggled_worker``, the toggle in
``EBB_BENCH_TOGGLES``) or a client patched in this process: ``--seq`` jobs one at a time (median
latency), then ``--jobs`` in flight (jobs/s, CPU per job from /proc). The lean churn of the same
three queues runs first and last, as the yardstick of target (c).

Toggles ("on" means the step as named, the code as it was or would be):

- ``transient_result`` (worker): the result is transient (breaks a guarantee: measured only)
- ``task_events`` (worker): Celery task events on from the start (``EBB_TASK_EVENTS``), what a
  worker sends while Flower watches it
- ``metrics`` (worker): Prometheus metrics on (``EBB_METRICS_PORT``, scraped by nobody)
- ``no_cancel_before_delete`` (client): no ``basic.cancel`` before the queues' delete (RabbitMQ
  then tells the client its consumers are gone)

    .venv/bin/python bench/bench_toggles.py [--toggle NAME ...] [--jobs N] [--seq N] [--rounds 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/bench_toggles.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_jobs
from bench.bench_jobs import METER, Stats, Tracker, say
from bench.broker_breakdown import Ctl
from bench.harness import INTERRUPTS, meter_for, remove_logs, worker
from ebb import JobClient, Settings
from ebb.contract import QueueKind
from tests.support import free_port

WORKER_TOGGLES = {"transient_result"}


#: Steps switched on by the worker's environment: what watching a worker costs.
ENV_TOGGLES: dict[str, Callable[[], dict[str, str]]] = {
    "task_events": lambda: {"EBB_TASK_EVENTS": "true"},
    "metrics": lambda: {"EBB_METRICS_PORT": str(free_port())},
}


def _no_cancel(client: JobClient) -> None:
    """Consumers are forgotten, not cancelled: the delete cancels them on the broker's side."""

    def stop_consuming(watch: Any, kinds: frozenset[QueueKind]) -> None:
        channel = client._consume_channel
        for kind in kinds:
            tag = watch.consumers.pop(kind, None)
            if tag is not None:
                channel.callbacks.pop(tag, None)
                channel.cancel_callbacks[tag] = lambda tag: None  # the broker's cancel, ignored

    client._stop_consuming = stop_consuming  # type: ignore[method-assign]


CLIENT_TOGGLES: dict[str, Callable[[JobClient], None]] = {
    "no_cancel_before_delete": _no_cancel,
}


@dataclasses.dataclass
class Round:
    toggle: str
    on: bool
    seq: Stats
    flight: Stats
    kreds: float  # the node's reductions per job (thousands), every job of the round: steadier than CPU


def node_reductions(ctl: Ctl | None) -> int:
    """The node's reductions so far, all processes (0 without rabbitmqctl)."""
    if ctl is None:
        return 0
    return int(ctl.eval("element(1, erlang:statistics(exact_reductions)).").split()[-1])


def one_round(
    settings: Settings,
    track: Tracker,
    logs: Path,
    toggle: str,
    on: bool,
    n_seq: int,
    n_flight: int,
    ctl: Ctl | None,
) -> Round:
    env = {**os.environ, "EBB_TASK_QUEUE": settings.task_queue}
    env["EBB_BENCH_TOGGLES"] = toggle if on and toggle in WORKER_TOGGLES else ""
    if on and toggle in ENV_TOGGLES:
        env.update(ENV_TOGGLES[toggle]())
    log = logs / f"worker-{toggle}-{on}.log"
    node = f"bench-toggles-{uuid.uuid4().hex[:6]}"
    with (
        worker("bench.toggled_worker", f"{node}@%h", env, log, say) as proc,
        JobClient(settings=settings) as client,
    ):
        if on and toggle in CLIENT_TOGGLES:
            CLIENT_TOGGLES[toggle](client)
        bench_jobs.wait_ready(proc, log, bench_jobs.ebb_ready(client, track))
        say(f"{toggle} {'on' if on else 'off'}")
        before = node_reductions(ctl)
        seq, flight, _ = bench_jobs.ebb(client, track, True, n_seq, n_flight, 10)
        kreds = (node_reductions(ctl) - before) / (n_seq + n_flight + 60) / 1000  # 60: the warm-ups
    assert seq is not None
    return Round(toggle, on, seq, flight, kreds)


def lean_round(settings: Settings, track: Tracker, n: int, ctl: Ctl | None) -> tuple[Stats, float]:
    before = node_reductions(ctl)
    stats = bench_jobs.lean_churn(settings, track, n, 20)
    return stats, (node_reductions(ctl) - before) / (n + 20) / 1000


def summary(
    rounds: list[Round], lean: list[Stats], lean_kreds: list[float], load: tuple[float, float]
) -> str:
    lean_cpu = statistics.mean(s.cpu_ms.get("rabbitmq", 0.0) for s in lean)
    lean_median = statistics.mean(s.median_ms or 0.0 for s in lean)
    each_lean = ", ".join(f"{s.cpu_ms.get('rabbitmq', 0.0):.2f}" for s in lean)
    lines = [
        f"lean churn: RabbitMQ {lean_cpu:.2f} ms CPU/job, median {lean_median:.2f} ms "
        f"({each_lean}), {statistics.mean(lean_kreds):.1f} thousand reductions/job; "
        f"load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}",
        "",
        f"{'toggle':<26}{'state':>5}{'RabbitMQ ms/job':>17}{'/ lean':>8}{'worker ms':>11}"
        f"{'client ms':>11}{'jobs/s':>9}{'median ms':>11}{'kreds/job':>11}",
    ]
    for toggle in dict.fromkeys(r.toggle for r in rounds):
        for on in (False, True):
            mine = [r for r in rounds if r.toggle == toggle and r.on == on]
            if not mine:
                continue
            flight = Stats.combined([r.flight for r in mine])
            rabbit = flight.cpu_ms.get("rabbitmq", 0.0)
            each = "/".join(f"{r.flight.cpu_ms.get('rabbitmq', 0.0):.2f}" for r in mine)
            median = statistics.mean(r.seq.median_ms or 0.0 for r in mine)
            lines.append(
                f"{toggle:<26}{'on' if on else 'off':>5}{rabbit:>9.2f} ({each}){rabbit / lean_cpu:>6.2f}"
                f"{flight.cpu_ms.get('worker', 0.0):>11.2f}{flight.cpu_ms.get('client', 0.0):>11.2f}"
                f"{flight.jobs_per_s:>9.1f}{median:>11.2f}"
                f"{statistics.mean(r.kreds for r in mine):>11.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    known = sorted(WORKER_TOGGLES | set(ENV_TOGGLES) | set(CLIENT_TOGGLES))
    parser.add_argument("--toggle", action="append", choices=known, help="(all)")
    parser.add_argument("--jobs", type=int, default=300, help="jobs in flight per round (300)")
    parser.add_argument("--seq", type=int, default=50, help="sequential jobs per round (50)")
    parser.add_argument("--churn", type=int, default=300, help="lean churn jobs, first and last (300)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per toggle, ABBA order (4)")
    parser.add_argument("--rabbitmqctl", default=os.environ.get("EBB_TEST_RABBITMQCTL", "rabbitmqctl"))
    parser.add_argument("--node", default=os.environ.get("EBB_TEST_RABBITMQ_NODE"))
    parser.add_argument("--no-reductions", action="store_true", help="no rabbitmqctl eval for reductions")
    args = parser.parse_args(argv)

    base = Settings.from_env()
    broker = bench_jobs.measured_target(base)
    METER.groups = meter_for(broker)
    say(f"measuring {broker.describe()}")
    ctl = None if args.no_reductions else Ctl(shlex.split(args.rabbitmqctl), args.node or broker.node)
    INTERRUPTS.install()
    settings = dataclasses.replace(base, task_queue=f"bench.ebb.{uuid.uuid4().hex[:8]}")
    queues = [settings.task_queue, f"{settings.task_queue}.audit"]  # the worker declares both
    track = Tracker(task_queues=queues, exchanges=[settings.task_queue])
    logs = Path(tempfile.mkdtemp(prefix="ebb-toggles-"))
    load_before = os.getloadavg()[0]
    rounds: list[Round] = []
    lean: list[Stats] = []
    lean_kreds: list[float] = []
    order = [(i % 4) in (1, 2) for i in range(args.rounds)]  # off, on, on, off, ...
    try:
        for toggle in [None, *(args.toggle or known), None]:
            if toggle is None:  # the lean churn, first and last
                stats, kreds = lean_round(base, track, args.churn, ctl)
                lean.append(stats)
                lean_kreds.append(kreds)
                continue
            for on in order:
                rounds.append(one_round(settings, track, logs, toggle, on, args.seq, args.jobs, ctl))
    finally:
        bench_jobs.cleanup(base, track)
    print(f"RabbitMQ {broker.version}, {broker.node}; {args.jobs} in flight, {args.seq} sequential per round")
    print(summary(rounds, lean, lean_kreds, (load_before, os.getloadavg()[0])))
    remove_logs(logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
