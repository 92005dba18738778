"""Ebb's caller library: submit Celery jobs whose reply queues clean themselves up."""

from sdk.client import JobClient
from sdk.config import Settings
from sdk.contract import JobError, JobResult, JobStatus, ProgressUpdate, QueueKind, StatusUpdate
from sdk.errors import (
    CallbackError,
    ClientClosedError,
    EbbError,
    JobFailedError,
    JobQueuesExpiredError,
    UnknownJobError,
    UnknownWorkflowError,
)
from sdk.job import Job
from sdk.registry import JobRecord, RegistryUnavailableError
from sdk.workers import WorkflowInfo

__all__ = [
    "CallbackError",
    "ClientClosedError",
    "EbbError",
    "Job",
    "JobClient",
    "JobError",
    "JobFailedError",
    "JobQueuesExpiredError",
    "JobRecord",
    "JobResult",
    "JobStatus",
    "ProgressUpdate",
    "QueueKind",
    "RegistryUnavailableError",
    "Settings",
    "StatusUpdate",
    "UnknownJobError",
    "UnknownWorkflowError",
    "WorkflowInfo",
]
