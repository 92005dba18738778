"""The ``ebb`` command line for callers and operators."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import click

from sdk import Job, JobClient, JobResult, ProgressUpdate, Settings, StatusUpdate
from tasks.broker_api import BrokerAPI


@click.group()
def main() -> None:
    """Ebb: Celery jobs whose per-job RabbitMQ queues clean themselves up."""


def _worker_running(settings: Settings) -> bool:
    from tasks.app import app

    replies = app.control.inspect(timeout=1.0).active_queues() or {}
    return any(q.get("name") == settings.task_queue for queues in replies.values() for q in queues)


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
    )


@main.command()
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
