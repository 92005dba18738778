"""Operator commands, ``ebb demo`` and ``ebb audit``: they need the worker side, so they live here.

The service's distribution adds them to the caller library's ``ebb`` command through the
``ebb.commands`` entry point group (see ``pyproject.toml``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import redis

from ebb import Job, JobClient, JobResult, ProgressUpdate, Settings, StatusUpdate, links
from ebb.cli.base import handles_errors
from ebb.workers import list_workflows
from tasks.audit import Auditor, AuditReport
from tasks.broker_api import BrokerAPI

SERVICE_ROOT = str(Path(__file__).resolve().parent.parent)


def _worker_running(settings: Settings) -> bool:
    """A live worker on our task queue advertises demo.sleep in Redis (see ebb.workers)."""
    client = links.redis_client(settings, timeout=2)
    try:
        found = list_workflows(client, settings.task_queue, settings.vhost)
        return any(w.name == "demo.sleep" for w in found)
    except redis.RedisError as exc:
        raise links.registry_error(exc, settings, "cannot look for a running worker") from exc


def _start_worker() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "-l",
            "WARNING",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"ebb-demo-{os.getpid()}@%h",
        ],
        stdout=subprocess.DEVNULL,
        cwd=SERVICE_ROOT,  # Celery imports -A tasks from here, never a user's tasks.py on the path
    )


@click.command()
@handles_errors
@click.option("--seconds", default=2.0, show_default=True, help="How long the demo job sleeps.")
@click.option("--steps", default=4, show_default=True, help="How many progress reports it sends.")
def demo(seconds: float, steps: int) -> None:
    """Run one demo job end to end, then show that its queues are gone."""
    settings = Settings.from_env()
    worker = None
    if not _worker_running(settings):
        click.echo(f"no worker consumes {settings.task_queue}: starting one (celery -A tasks worker)")
        worker = _start_worker()
        deadline = time.monotonic() + 60
        while not _worker_running(settings):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise click.ClickException("the demo worker did not start; run celery -A tasks worker")
            time.sleep(0.2)
    try:
        with JobClient(settings=settings) as client:

            def on_status(job: Job, update: StatusUpdate) -> None:
                click.echo(f"  status   {update.status.value}")

            def on_progress(job: Job, update: ProgressUpdate) -> None:
                click.echo(f"  progress {update.progress:6.1%}  {update.message}")

            def on_finished(job: Job, result: JobResult) -> None:
                click.echo(f"  result   {result.status.value} {result.output}")

            job = client.submit_job(
                "demo.sleep",
                {"seconds": seconds, "steps": steps},
                on_status=on_status,
                on_progress=on_progress,
                on_finished=on_finished,
                auto_cleanup_after_ttl=600,  # an interrupted demo leaves nothing behind for long
            )
            click.echo(
                f"submitted job {job.id}; queues: {', '.join(job.queue_name(k) for k in sorted(job.queues))}"
            )
            client.wait(job, timeout=seconds + 60)
        left: list[dict[str, Any]] = [
            q for q in BrokerAPI(settings).job_queues(("name",)) if str(job.id) in q["name"]
        ]
        if left:
            raise click.ClickException(f"queues left behind: {[q['name'] for q in left]}")
        click.echo(f"job {job.id} done; the broker holds none of its queues any more")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--delete-unexpiring",
    is_flag=True,
    help="Also delete jobs.* queues without x-expires that have no consumer.",
)
@handles_errors
def audit(as_json: bool, delete_unexpiring: bool) -> None:
    """Run the orphaned-queue audit now and print its report (reads the management API only)."""
    settings = Settings.from_env()
    report = Auditor(settings).run(delete_unexpiring=delete_unexpiring or None)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print_audit(report)


def _print_audit(report: AuditReport) -> None:
    rows = [f for f in report.findings if f.state != "in_use"]
    click.echo(f"{'QUEUE':<58} {'STATE':<10} {'MSGS':>5} {'IDLE_S':>8} {'REMOVAL (est.)':<20} REGISTRY")
    for f in rows:
        removal = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.removal_estimate)) if f.removal_estimate else "-"
        )
        click.echo(
            f"{f.queue:<58} {f.state:<10} {f.messages if f.messages is not None else '-':>5} "
            f"{f.idle_s if f.idle_s is not None else '-':>8} {removal:<20} "
            f"{f.registry_status or ('unknown' if not f.registered else '-')}"
        )
    for removed in report.removed:
        click.echo(f"removed since last run: {removed['queue']} ({removed['lost']})")
    for name in report.deleted:
        click.echo(f"deleted (no x-expires, unused): {name}")
    counts = ", ".join(f"{k}={v}" for k, v in report.counts().items())
    click.echo(f"{len(report.findings)} job queues in {report.duration_s:.2f}s: {counts}")
