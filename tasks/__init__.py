"""Worker side of Ebb: the Celery app (``celery -A tasks worker``), the job task and beat audit.

``tasks.install.install(your_app)`` puts the same job task, signals and audit on an app of yours.
"""

from tasks.app import app

__all__ = ["app"]
