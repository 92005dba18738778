"""Caller commands: submit, watch, status, cancel, workflows."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import timedelta

import click
import redis

from ebb import Job, JobClient, JobResult, Settings, links
from ebb.cli.base import (
    EXIT_DETACHED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Duration,
    fail,
    handles_errors,
    main,
    parse_params,
)
from ebb.cli.view import JobView
from ebb.contract import parse_job_id
from ebb.errors import RegistryUnavailableError, UnknownJobError
from ebb.registry import Registry
from ebb.workers import WorkflowInfo, list_workflows

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


def _follow(client: JobClient, job: Job, view: JobView) -> None:
    """Wait for the result; Ctrl-C detaches, leaving the queues to wait (TTL) for ``ebb watch``."""
    try:
        while True:
            try:
                result = client.wait(job, timeout=0.5)
                break
            except TimeoutError:
                continue
    except KeyboardInterrupt:
        view.emit("detached", job_id=job.id, reconnect=f"ebb watch {job.id}", ttl=job.ttl)
        client.close()
        click.echo(
            f"detached; job {job.id} goes on and its queues wait {job.ttl} for you: ebb watch {job.id}",
            err=True,
        )
        sys.exit(EXIT_DETACHED)
    _exit_for(result)


def _advertised(client: JobClient, workflow: str) -> WorkflowInfo | None:
    """The workflow as workers advertise it, for its schema; ``None`` if Redis cannot say."""
    try:
        return next((w for w in client.list_workflows() if w.name == workflow), None)
    except RegistryUnavailableError:
        return None  # submit_job warns and lets the worker judge


def _exit_for(result: JobResult) -> None:
    sys.exit(EXIT_OK if result.succeeded else EXIT_JOB_FAILED)


@main.command()
@click.argument("workflow")
@click.option(
    "--param",
    "-p",
    "pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A parameter, read as the type the workflow's schema gives it (else as JSON if it parses).",
)
@click.option("--params-file", type=click.Path(dir_okay=False), help="A JSON object of parameters.")
@click.option("--ttl", type=Duration(), help="How long unused queues survive (default EBB_DEFAULT_TTL).")
@click.option("--timeout", "job_timeout", type=Duration(), help="Longest running time, e.g. 10m.")
@click.option("--detach", is_flag=True, help="Print the job id and return at once.")
@json_option
@handles_errors
def submit(
    workflow: str,
    pairs: tuple[str, ...],
    params_file: str | None,
    ttl: timedelta | None,
    job_timeout: timedelta | None,
    detach: bool,
    as_json: bool,
) -> None:
    """Submit WORKFLOW and follow it live (Ctrl-C detaches; the job goes on)."""
    view = JobView(as_json=as_json)
    with JobClient() as client, view if not detach else contextlib.nullcontext():
        params = parse_params(pairs, params_file, _advertised(client, workflow))
        callbacks = (
            {}
            if detach
            else {
                "on_status": view.on_status,
                "on_progress": view.on_progress,
                "on_finished": view.on_finished,
            }
        )
        job = client.submit_job(
            workflow,
            params,
            auto_cleanup_after_ttl=ttl,
            job_timeout=job_timeout,
            updates=detach,  # a later ebb watch then shows status and progress too
            **callbacks,  # type: ignore[arg-type]
        )
        if as_json:
            view.opened(event="submitted", job_id=str(job.id), job=json.loads(job.to_json()))
        else:
            view.opened(text=str(job.id))
        if detach:
            # The queues exist from now on; nobody consumes them, so their TTL starts at once.
            client.disconnect_from_submitted_job(job, delete_queues=False)
            return
        _follow(client, job, view)


@main.command()
@click.argument("job_id")
@json_option
@handles_errors
def watch(job_id: str, as_json: bool) -> None:
    """Reconnect to a submitted job and follow it live, receiving what waited."""
    view = JobView(as_json=as_json)
    with JobClient() as client:
        job = client.connect_to_submitted_job(
            job_id, on_status=view.on_status, on_progress=view.on_progress, on_finished=view.on_finished
        )
        view.opened()
        with view:
            _follow(client, job, view)


@main.command()
@click.argument("job_id")
@json_option
@handles_errors
def status(job_id: str, as_json: bool) -> None:
    """What the job registry knows of JOB_ID (reads Redis only; never renews the queues' TTL)."""
    settings = Settings.from_env()
    parsed = parse_job_id(job_id)
    record = Registry(settings).get(parsed)
    if record is None:
        raise UnknownJobError(parsed)
    if as_json:
        data = {k: (str(v) if k in ("job_id", "ttl") else v) for k, v in record.__dict__.items()}
        click.echo(json.dumps(data))
    else:
        click.echo(record.story())


@main.command()
@click.argument("job_id")
@json_option
@handles_errors
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel JOB_ID: a queued job never starts, a running one is stopped."""
    with JobClient() as client:
        client.cancel_job(job_id)
    if as_json:
        click.echo(json.dumps({"event": "cancel_requested", "job_id": job_id}))
    else:
        click.echo(f"cancellation of {job_id} requested; its caller receives a CANCELLED result")


@main.command()
@json_option
@handles_errors
def workflows(as_json: bool) -> None:
    """Workflows the live workers advertise."""
    settings = Settings.from_env()
    try:
        found = list_workflows(links.redis_client(settings, timeout=3), settings.task_queue, settings.vhost)
    except redis.RedisError as exc:
        fail(
            EXIT_UNREACHABLE,
            str(links.registry_error(exc, settings, "cannot list workflows")),
            as_json=as_json,
        )
    if as_json:
        click.echo(json.dumps([w.__dict__ for w in found]))
        return
    if not found:
        click.echo(f"no live worker on {settings.task_queue}; start one: celery -A tasks worker")
    for w in found:
        click.echo(f"{w.name}  ({w.workers} worker{'s' if w.workers != 1 else ''})  {w.description}")
        parameters = w.parameters()
        if not parameters:
            names = ", ".join(w.params) if w.params and w.params != ("*",) else "any"
            click.echo(f"    params: {names} (untyped)")
        for p in parameters:
            default = (
                "required"
                if p.required
                else (f"default {json.dumps(p.default)}" if p.has_default else "optional")
            )
            about = f"  {p.description}" if p.description else ""
            click.echo(f"    {p.name:<14} {p.type:<28} {default}{about}")
