"""The ``ebb.run_job`` task: run one workflow and report on the job's reply queues."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from sdk import contract
from sdk.config import Settings
from sdk.contract import JobError, JobStatus, QueueKind, TaskRequest
from sdk.logfmt import log_event
from sdk.registry import Registry
from tasks import workflows
from tasks.app import app
from tasks.publisher import ReplyPublisher

logger = logging.getLogger("ebb.worker")
settings = Settings.from_env()
workflows.load_modules(("tasks.demo", *settings.workflow_modules))
registry = Registry(settings.redis_url, settings.registry_grace)


class JobReporter:
    """Numbers and publishes one job's status, progress and result messages."""

    def __init__(self, request: TaskRequest, publisher: ReplyPublisher) -> None:
        self.request = request
        self.publisher = publisher
        self.last_seq: dict[str, int] = {}

    def _send(self, kind: QueueKind, build: Any) -> None:
        if kind not in self.request.queues:
            return  # the caller did not ask for it, so the queue was never declared
        seq = self.last_seq.get(kind.value, 0) + 1
        self.last_seq[kind.value] = seq
        message = build(seq)
        self.publisher.publish(contract.queue_name(self.request.job_id, kind), message.to_dict())

    def status(self, status: JobStatus) -> None:
        self._send(
            QueueKind.STATUS,
            lambda seq: contract.StatusUpdate(self.request.job_id, status, seq, contract.now()),
        )

    def progress(self, fraction: float, message: str = "") -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"progress must be a number between 0.0 and 1.0, not {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress must be between 0.0 and 1.0, not {fraction}")
        self._send(
            QueueKind.PROGRESS,
            lambda seq: contract.ProgressUpdate(
                self.request.job_id, float(fraction), str(message), seq, contract.now()
            ),
        )

    def result(self, status: JobStatus, output: Any = None, error: JobError | None = None) -> None:
        result = contract.JobResult(
            job_id=self.request.job_id,
            status=status,
            output=output,
            error=error,
            last_seq=dict(self.last_seq),
            at=contract.now(),
        )
        delivered = self.publisher.publish(
            contract.queue_name(self.request.job_id, QueueKind.RESULT), result.to_dict()
        )
        registry.write(
            self.request.job_id,
            self.request.ttl,
            {
                "status": status.value,
                "finished_at": result.at,
                "lost": None if delivered else "result dropped: its queue had expired before the job ended",
            },
        )
        log_event(
            logger,
            logging.INFO,
            "job_result_published" if delivered else "job_result_dropped",
            job_id=self.request.job_id,
            queue=contract.queue_name(self.request.job_id, QueueKind.RESULT),
            status=status.value,
        )


@app.task(name=contract.TASK_NAME, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def run_job(self: Task, request: dict[str, Any]) -> str:
    """Run the requested workflow; every outcome, failure included, goes to the result queue."""
    try:
        parsed = TaskRequest.from_dict(request)
    except contract.MalformedMessageError as exc:
        log_event(logger, logging.ERROR, "task_malformed", task_id=self.request.id, error=exc)
        return "MALFORMED"
    reporter = JobReporter(parsed, ReplyPublisher.for_process(settings))
    log_event(logger, logging.INFO, "job_started", job_id=parsed.job_id, workflow=parsed.workflow)
    registry.write(
        parsed.job_id,
        parsed.ttl,
        {"status": JobStatus.RUNNING.value, "started_at": contract.now(), "workflow": parsed.workflow},
    )
    reporter.status(JobStatus.RUNNING)
    try:
        fn = workflows.get(parsed.workflow)
        output = fn(parsed.params, reporter.progress)
        contract.encode({"output": output})  # refuse what cannot travel as JSON, as an ERROR
    except Exception as exc:
        log_event(
            logger,
            logging.WARNING,
            "job_failed",
            job_id=parsed.job_id,
            workflow=parsed.workflow,
            error=repr(exc),
        )
        reporter.status(JobStatus.ERROR)
        reporter.result(JobStatus.ERROR, error=JobError(type(exc).__name__, str(exc)))
        return JobStatus.ERROR.value
    reporter.status(JobStatus.SUCCEEDED)
    reporter.result(JobStatus.SUCCEEDED, output=output)
    return JobStatus.SUCCEEDED.value
