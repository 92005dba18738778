"""The ``ebb`` command line: ``ebb submit|watch|status|cancel|workflows|audit|demo``."""

from tasks.cli import jobs as _jobs  # noqa: F401  (registers the job commands)
from tasks.cli import ops as _ops  # noqa: F401  (registers the operator commands)
from tasks.cli.base import main

__all__ = ["main"]
