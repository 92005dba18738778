"""The ``ebb`` command line: ``ebb submit|watch|status|cancel|workflows`` (and, from Ebb's service,
``audit`` and ``demo``). Needs the ``cli`` extra: ``pip install './sdk[cli]'``."""

from ebb.cli import commands as _commands  # noqa: F401  (registers the caller commands)
from ebb.cli.base import main

__all__ = ["main"]
