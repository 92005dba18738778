"""Ebb's caller library: submit Celery jobs whose RabbitMQ reply queues clean themselves up."""

from ebb.client import JobClient
from ebb.config import Settings
from ebb.contract import JobError, JobResult, JobStatus, ProgressUpdate, QueueKind, StatusUpdate
from ebb.errors import (
    BrokerCredentialsRefusedError,
    BrokerUnavailableError,
    CallbackError,
    ClientClosedError,
    ClientUsageError,
    ConfigurationError,
    CredentialsRefusedError,
    EbbError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    InvalidParamsError,
    JobFailedError,
    JobQueuesExpiredError,
    JobQueuesUnavailableError,
    MalformedMessageError,
    QueueUnavailableError,
    RegistryCredentialsRefusedError,
    RegistryUnavailableError,
    UnavailableError,
    UnknownJobError,
    UnknownWorkflowError,
    WaitTimeoutError,
)
from ebb.job import Job
from ebb.records import JobRecord
from ebb.workers import WorkflowInfo

__all__ = [
    "BrokerCredentialsRefusedError",
    "BrokerUnavailableError",
    "CallbackError",
    "ClientClosedError",
    "ClientUsageError",
    "ConfigurationError",
    "CredentialsRefusedError",
    "EbbError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "InvalidParamsError",
    "Job",
    "JobClient",
    "JobError",
    "JobFailedError",
    "JobQueuesExpiredError",
    "JobQueuesUnavailableError",
    "JobRecord",
    "JobResult",
    "JobStatus",
    "MalformedMessageError",
    "ProgressUpdate",
    "QueueKind",
    "QueueUnavailableError",
    "RegistryCredentialsRefusedError",
    "RegistryUnavailableError",
    "Settings",
    "StatusUpdate",
    "UnavailableError",
    "UnknownJobError",
    "UnknownWorkflowError",
    "WaitTimeoutError",
    "WorkflowInfo",
]
