"""The ``ebb.run_job`` task: run one workflow and report on the job's reply queues."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore
from pydantic import BaseModel

from ebb import contract
from ebb.config import Settings
from ebb.contract import JobError, JobStatus, QueueKind, TaskRequest
from ebb.errors import InvalidParamsError, MalformedMessageError, UnknownWorkflowError
from ebb.logfmt import log_event
from ebb.records import JobRecord
from ebb.registry import Registry
from tasks import metrics, watching, workflows
from tasks.interrupt import Interrupter, JobInterrupted
from tasks.publisher import PublishRefused, ReplyPublisher, ResultUndeliverable

logger = logging.getLogger("ebb.worker")
settings = Settings.from_env()
workflows.load_modules(("tasks.demo", *settings.workflow_modules))
registry = Registry(settings)


class JobReporter:
    """Numbers and publishes one job's status, progress and result messages."""

    #: Flower hears of progress at most this often per job (as a custom PROGRESS task state).
    FLOWER_PROGRESS_EVERY = 1.0

    def __init__(
        self, request: TaskRequest, publisher: ReplyPublisher, attempt: int, task: Task | None = None
    ) -> None:
        self.request = request
        self.publisher = publisher
        self.attempt = attempt
        self.task = task
        self.last_seq: dict[str, int] = {}
        self._flower_sent_at = 0.0
        self._started = time.monotonic()

    def _send(self, kind: QueueKind, build: Any) -> None:
        if kind not in self.request.queues:
            return  # the caller did not ask for it, so the queue was never declared
        seq = self.last_seq.get(kind.value, 0) + 1
        self.last_seq[kind.value] = seq
        message = build(seq)
        self.publisher.publish(
            contract.queue_name(self.request.job_id, kind),
            message,
            persistent=contract.is_persistent(message),
        )

    def status(self, status: JobStatus) -> None:
        self._send(
            QueueKind.STATUS,
            lambda seq: contract.StatusUpdate(self.request.job_id, status, seq, contract.now(), self.attempt),
        )

    def progress(self, fraction: float, message: str = "") -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"progress must be a number between 0.0 and 1.0, not {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress must be between 0.0 and 1.0, not {fraction}")
        self._send(
            QueueKind.PROGRESS,
            lambda seq: contract.ProgressUpdate(
                self.request.job_id, float(fraction), str(message), seq, contract.now(), self.attempt
            ),
        )
        self._tell_flower(float(fraction), str(message))

    def _tell_flower(self, fraction: float, message: str) -> None:
        """A ``task-progress`` event: Flower shows the task in state PROGRESS with these fields."""
        now = time.monotonic()
        if now - self._flower_sent_at < self.FLOWER_PROGRESS_EVERY and fraction < 1.0:
            return
        self._flower_sent_at = now
        self._send_event("task-progress", progress=round(fraction, 4), message=message[:200])

    def _send_event(self, kind: str, *, last: bool = False, **fields: Any) -> None:
        """A task event of Ebb's own, sent only while someone watches (Flower).

        A ``last`` one (the job's end) goes whatever this process last heard: Celery's
        ``Ignore`` sends no event after it, and Flower would show the job running for ever.
        """
        if self.task is None or not (last or watching.watched()):
            return
        try:
            self.task.send_event(kind, **fields)
        except Exception as exc:  # monitoring must never break a job
            log_event(logger, logging.DEBUG, "task_event_failed", job_id=self.request.job_id, error=repr(exc))

    def finish(self, status: JobStatus, output: Any = None, error: JobError | None = None) -> str:
        """The one result, which carries the final status; then tell Celery (and Flower) how it ended.

        No final status message: callers' ``on_status`` takes it from the result (``ebb.core``),
        one message less per job for RabbitMQ.

        SUCCEEDED returns (Celery SUCCESS); ERROR raises :class:`JobEnded` (Celery FAILURE, its
        message naming the status, logged without a traceback). CANCELLED and TIMEOUT are not
        failures: the task's last event is ``task-cancelled`` or ``task-timeout``, which Flower
        shows as a state of that name, and Celery's ``Ignore`` acks the task without a
        ``task-failed`` event to overwrite it.
        """
        # Measured as it would go out: too large, and an ERROR result says so instead.
        size = len(contract.encode_message(self._result(status, output, error)))
        if size > settings.max_result_bytes:
            status, output = JobStatus.ERROR, None
            error = JobError(
                "ResultTooLarge",
                f"the job's result is {size} bytes as JSON, over the limit of "
                f"{settings.max_result_bytes} bytes (EBB_MAX_RESULT_BYTES, at most the broker's "
                "max_message_size): return less, or store the output elsewhere and return a reference",
            )
            log_event(
                logger,
                logging.WARNING,
                "result_too_large",
                job_id=self.request.job_id,
                size=size,
                limit=settings.max_result_bytes,
            )
        status, error = self.result(self._result(status, output, error))
        if status is JobStatus.SUCCEEDED:
            return status.value
        detail = f"{error.type}: {error.message}" if error else "no details"
        ended = f"job {self.request.job_id} ended {status.value}: {detail}"
        if status in (JobStatus.CANCELLED, JobStatus.TIMEOUT) and self.task is not None:
            self._send_event(
                f"task-{status.value.lower()}", last=True, exception=ended[:300], runtime=self._runtime()
            )
            raise Ignore()
        raise JobEnded(ended)

    def _runtime(self) -> float:
        return round(time.monotonic() - self._started, 3)

    def _result(self, status: JobStatus, output: Any, error: JobError | None) -> contract.JobResult:
        return contract.JobResult(
            job_id=self.request.job_id,
            status=status,
            output=output,
            error=error,
            last_seq=dict(self.last_seq),
            at=contract.now(),
            attempt=self.attempt,
        )

    def result(self, result: contract.JobResult) -> tuple[JobStatus, JobError | None]:
        """Publish the one result, then record how the job ended; the status it really ended in.

        The registry is written after the broker confirmed the result, so it never says
        SUCCEEDED for a result nobody can receive (the caller writes the status too, when it
        takes the result). A result the broker refuses becomes an ERROR result that says why;
        if even that is refused, the registry says what was lost.
        """
        queue = contract.queue_name(self.request.job_id, QueueKind.RESULT)
        lost: str | None = None
        retry = settings.result_retry
        try:
            delivered = self.publisher.publish(queue, result, keep_trying_for=retry)
        except ResultUndeliverable as undeliverable:
            delivered, lost = False, f"result not delivered: {undeliverable}"
            metrics.result_not_delivered(self.request.workflow, "undeliverable")
            log_event(
                logger,
                logging.ERROR,
                "result_undeliverable",
                job_id=self.request.job_id,
                queue=queue,
                error=undeliverable,
            )
        except PublishRefused as refused:
            metrics.result_not_delivered(self.request.workflow, "refused")
            log_event(
                logger,
                logging.ERROR,
                "result_refused",
                job_id=self.request.job_id,
                queue=queue,
                error=refused,
            )
            result = self._result(JobStatus.ERROR, None, JobError("ResultRefused", str(refused)))
            try:
                delivered = self.publisher.publish(queue, result, keep_trying_for=retry)
            except (PublishRefused, ResultUndeliverable) as again:
                delivered, lost = False, f"result not published: {again}"
        if not delivered and lost is None:
            lost = "result dropped: its queue had expired before the job ended"
            metrics.result_not_delivered(self.request.workflow, "expired")
        fields: dict[str, Any] = {"status": result.status.value, "finished_at": result.at}
        if lost is not None:
            fields["lost"] = lost
        registry.write(self.request.job_id, self.request.ttl, fields)
        log_event(
            logger,
            logging.INFO,
            "job_result_published" if delivered else "job_result_dropped",
            job_id=self.request.job_id,
            queue=queue,
            status=result.status.value,
        )
        metrics.job_finished(self.request.job_id, self.request.workflow, result.status, self._started)
        return result.status, result.error


class _LogCapture(logging.Handler):
    """Keeps what the workflow logs while it runs, for the ERROR result (at most MAX_LOG_LINES)."""

    MAX_LOG_LINES = 200

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and len(self.lines) < self.MAX_LOG_LINES:
            self.lines.append(self.format(record))

    @contextmanager
    def attached(self) -> Iterator[_LogCapture]:
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)


def _begin(request: TaskRequest, redelivered: bool) -> tuple[int, JobRecord | None] | None:
    """Count this run; ``None`` when the job must not run again (it already has its result)."""
    try:
        attempt, record = registry.begin_attempt(request.job_id, request.ttl)
    except redis.RedisError as exc:
        log_event(logger, logging.WARNING, "registry_unavailable", job_id=request.job_id, error=repr(exc))
        return (2 if redelivered else 1), None
    if record is None or (record.finished_at is None and (attempt == 1 or redelivered)):
        return attempt, record
    # Either its result is out already, or this is a copy its caller sent again because the
    # first one's confirm never came (ebb.unsettled): not a redelivery, and the job has begun.
    copy = not redelivered
    if copy:
        registry.forget_attempt(request.job_id)  # a copy is not a run
    log_event(
        logger,
        logging.INFO if copy else logging.WARNING,
        "job_copy_skipped" if copy else "job_rerun_skipped",
        job_id=request.job_id,
        status=record.status,
        reason="a copy of a job that has begun" if copy else "redelivered after its result was published",
    )
    return None


def _refuse_malformed(request: object, problem: MalformedMessageError) -> None:
    """Tell the caller why, on its result queue, when the request still names a job.

    A caller of another language that gets the contract wrong then reads an ERROR result
    saying what is wrong, instead of waiting for its queues to expire. The queue is never
    created here: a mandatory publish to a queue that does not exist is simply returned.
    """
    raw_id = request.get("job_id") if isinstance(request, dict) else None
    try:
        job_id = contract.parse_job_id(raw_id)
    except ValueError:
        return
    result = contract.JobResult(
        job_id=job_id,
        status=JobStatus.ERROR,
        error=JobError("MalformedMessageError", f"the task request was refused: {problem}"),
        at=contract.now(),
    )
    queue = contract.queue_name(job_id, QueueKind.RESULT)
    delivered = ReplyPublisher.for_process(settings).publish(queue, result)
    log_event(
        logger,
        logging.INFO,
        "job_result_published" if delivered else "job_result_dropped",
        job_id=job_id,
        queue=queue,
        status=result.status.value,
    )


class JobEnded(Exception):
    """How Celery hears that a job ended ERROR, TIMEOUT or CANCELLED (after its result was published)."""


def run_job(self: Task, request: dict[str, Any]) -> str:
    """Run the requested workflow; every outcome, failure included, goes to the result queue.

    Registered as ``ebb.run_job`` on a Celery app by :func:`tasks.install.install`.
    """
    try:
        parsed = TaskRequest.from_celery_arg(request)
    except MalformedMessageError as exc:
        log_event(logger, logging.ERROR, "task_malformed", task_id=self.request.id, error=exc)
        _refuse_malformed(request, exc)
        return "MALFORMED"
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    begun = _begin(parsed, redelivered)
    if begun is None:
        return "SKIPPED"
    attempt, record = begun
    metrics.job_attempt(parsed.workflow, attempt, redelivered)
    reporter = JobReporter(parsed, ReplyPublisher.for_process(settings), attempt, self)
    if attempt > settings.max_attempts:
        why = (
            f"the job was started {attempt} times and its worker died each time before it ended "
            f"(limit EBB_MAX_ATTEMPTS={settings.max_attempts}); not trying again"
        )
        return reporter.finish(JobStatus.ERROR, error=JobError("WorkerLostError", why))
    if record is not None and record.cancel_requested_at is not None:
        return reporter.finish(
            JobStatus.CANCELLED, error=JobError("JobCancelled", "cancelled before it started")
        )
    try:
        entry = workflows.get(parsed.workflow)
        params = entry.params(parsed.workflow, parsed.params)
    except (UnknownWorkflowError, InvalidParamsError) as refused:
        # Adverts can be stale: the worker's own model has the last word, and the job never runs.
        log_event(
            logger,
            logging.WARNING,
            "job_refused",
            job_id=parsed.job_id,
            workflow=parsed.workflow,
            error=refused,
        )
        return reporter.finish(JobStatus.ERROR, error=JobError(type(refused).__name__, str(refused)))
    registry.write(
        parsed.job_id,
        parsed.ttl,
        {"status": JobStatus.RUNNING.value, "started_at": contract.now(), "workflow": parsed.workflow},
    )
    log_event(
        logger, logging.INFO, "job_started", job_id=parsed.job_id, workflow=parsed.workflow, attempt=attempt
    )
    metrics.job_started(parsed.job_id, parsed.workflow)
    reporter.status(JobStatus.RUNNING)
    interrupter = Interrupter.for_process(registry)

    def progress(fraction: float, message: str = "") -> None:
        with interrupter.deferred():  # never interrupted mid-publish (tasks/interrupt.py)
            reporter.progress(fraction, message)

    with _LogCapture().attached() as captured:
        try:
            with interrupter.running(parsed.job_id, parsed.timeout):
                output = entry.fn(params, progress)
            if isinstance(output, BaseModel):  # a typed workflow may return a model too
                output = output.model_dump(mode="json")
            contract.encode({"output": output})  # refuse what cannot travel as JSON, as an ERROR
        except JobInterrupted as stop:
            return reporter.finish(stop.status, error=JobError(stop.status.value, stop.detail))
        except Exception as exc:
            error = JobError(
                type(exc).__name__,
                str(exc),
                traceback="".join(traceback.format_exception(exc)),
                logs=tuple(captured.lines),
            )
            log_event(
                logger,
                logging.WARNING,
                "job_failed",
                job_id=parsed.job_id,
                workflow=parsed.workflow,
                error=repr(exc),
            )
            return reporter.finish(JobStatus.ERROR, error=error)
    return reporter.finish(JobStatus.SUCCEEDED, output=output)
