"""Worker side of Ebb: the Celery app (``celery -A tasks worker``), the job task and beat audit."""

from tasks import job as _job  # noqa: F401  (registers the ebb.run_job task)
from tasks.app import app

__all__ = ["app"]
