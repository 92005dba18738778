"""CPU time per process group, read from /proc, so a benchmark can say where a job's cost goes.

RabbitMQ is the bottleneck here: wall-clock throughput alone hides whether a change saved the
broker work or just moved it. Groups are found by command name (``beam.smp``, ``redis-server``),
by session (a worker started with ``start_new_session`` and its pool) or by pid (the client).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its closing one.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (fields 14 and 15 of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def by_command(name: str) -> Callable[[], list[int]]:
    def find() -> list[int]:
        found = []
        for pid in _all_pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    found.append(pid)
            except OSError:
                continue
        return found

    return find


def by_session(session: Callable[[], int | None]) -> Callable[[], list[int]]:
    """Every process of a session (a worker started with ``start_new_session`` and its pool)."""

    def find() -> list[int]:
        sid = session()
        if sid is None:
            return []
        found = []
        for pid in _all_pids():
            fields = _stat(pid)
            if fields is not None and int(fields[3]) == sid:
                found.append(pid)
        return found

    return find


class CpuMeter:
    """``start()`` then ``per_job(n)``: CPU milliseconds per job of each group in between."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._pids: dict[str, list[int]] = {}
        self._start: dict[str, float] = {}

    def start(self) -> None:
        # The same processes are read at both ends: one that starts in between is not counted.
        self._pids = {name: find() for name, find in self.groups.items()}
        self._start = {name: cpu_seconds(pids) for name, pids in self._pids.items()}

    def per_job(self, jobs: int) -> dict[str, float]:
        used = {name: cpu_seconds(pids) - self._start[name] for name, pids in self._pids.items()}
        return {name: round(seconds * 1000 / jobs, 2) for name, seconds in used.items()}
