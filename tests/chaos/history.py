"""The run's history: one JSON line per call, delivery, fault and sample, from every process.

Each line is written with one ``write`` to a file opened ``O_APPEND``, so lines from many
processes never interleave and a process killed with SIGKILL loses nothing it wrote.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class History:
    """Appends events for one process (``proc``: its role and number, e.g. ``caller-2``)."""

    def __init__(self, path: Path, proc: str) -> None:
        self.proc = proc
        #: The last ``*_error`` event written: the caller reads back what its last call raised.
        self.last_error: dict[str, Any] | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, ev: str, **fields: Any) -> None:
        line = {"t": time.time(), "proc": self.proc, "pid": os.getpid(), "ev": ev, **fields}
        os.write(self._fd, (json.dumps(line, default=str) + "\n").encode())
        if ev.endswith("_error"):
            self.last_error = line

    def close(self) -> None:
        os.close(self._fd)


def read(path: Path) -> list[dict[str, Any]]:
    """Every event, in the order written (a torn last line from a killed process is skipped)."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
