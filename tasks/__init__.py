"""Worker side of Ebb: the Celery app (``celery -A tasks worker``), the job task and beat audit."""

from tasks import advertise as _advertise  # noqa: F401  (tells callers what this worker runs)
from tasks import audit_task as _audit_task  # noqa: F401  (registers ebb.audit_queues)
from tasks import job as _job  # noqa: F401  (registers ebb.run_job)
from tasks import watching as _watching  # noqa: F401  (tells the pool whether events are watched)
from tasks.app import app

__all__ = ["app"]
