"""Serves Ebb's metrics on ``EBB_METRICS_PORT`` from a worker's or beat's main process.

Prefork-safe through prometheus_client's multiprocess mode: the main process binds the port,
then makes a fresh private directory for the tree's metric files (named by the port it holds, so
a restart on the same port wipes its predecessor's files and nothing else) and points
``PROMETHEUS_MULTIPROC_DIR`` at it before any metric value exists; pool processes forked after
that write their own files there, and each scrape sums them. A pool process that exits is marked
dead (its live gauges dropped): on a clean exit by itself, when SIGKILLed at the next scrape.
Callers, ``ebb audit`` and Flower never start a server: only a worker's main process (Celery's
``celeryd_after_setup``: logging set up, pool not forked yet) and beat (``beat_init``) do.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import glob
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from celery.signals import (
    after_task_publish,
    beat_init,
    celeryd_after_setup,
    task_postrun,
    worker_process_init,
    worker_process_shutdown,
)
from prometheus_client import CollectorRegistry, start_http_server, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from ebb import contract
from ebb.config import Settings
from ebb.logfmt import log_event
from tasks import metrics
from tasks.audit_task import AUDIT_TASK_NAME

logger = logging.getLogger("ebb.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Served:
    settings: Settings | None = None
    #: The process that serves (inherited by the processes it forks: they record, never serve).
    pid: int | None = None
    directory: Path | None = None


def install(settings: Settings) -> None:
    """Serve metrics from this app's workers and beat when ``settings.metrics_port`` is set."""
    _Served.settings = settings
    celeryd_after_setup.connect(_on_worker_setup, weak=False, dispatch_uid="ebb-metrics-worker")
    beat_init.connect(_on_beat_init, weak=False, dispatch_uid="ebb-metrics-beat")
    worker_process_init.connect(_on_pool_process_init, weak=False, dispatch_uid="ebb-metrics-init")
    worker_process_shutdown.connect(_on_pool_process_exit, weak=False, dispatch_uid="ebb-metrics-exit")
    task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="ebb-metrics-postrun")


def serve(settings: Settings, role: str) -> bool:
    """Bind the port, set up the multiprocess directory, turn recording on; False if not served."""
    port = settings.metrics_port
    if port is None or _Served.pid is not None:
        return False
    registry = CollectorRegistry(auto_describe=True)
    try:
        start_http_server(port, registry=registry)
        directory = _fresh_directory(port)
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
        log_event(
            logger,
            logging.ERROR,
            "metrics_port_in_use" if in_use else "metrics_server_failed",
            port=port,
            role=role,
            error=exc.strerror or repr(exc),
            detail="this process goes on without metrics"
            + ("; give each process on a host its own EBB_METRICS_PORT" if in_use else ""),
        )
        return False
    os.environ[MULTIPROC_ENV] = str(directory)
    registry.register(_TreeCollector(directory))
    _Served.pid, _Served.directory = os.getpid(), directory
    atexit.register(_remove_directory, directory, os.getpid())
    _record_here(role, start_at_zero=True)
    log_event(logger, logging.INFO, "metrics_serving", port=port, role=role, directory=directory)
    return True


def _record_here(role: str, *, start_at_zero: bool) -> None:
    """Metric values of this process's own, in files named by its pid.

    prometheus_client chose its value class when first imported (before the directory existed),
    and a forked process must not touch its parent's open files (embedded beat's process has
    them closed under it): a fresh value class and fresh metrics, in each process that records.
    """
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    metrics.enable(role, start_at_zero=start_at_zero)


def _fresh_directory(port: int) -> Path:
    """``<tmp>/ebb-metrics-<uid>/port-<port>``, emptied: only this user may write there."""
    base = Path(tempfile.gettempdir()) / f"ebb-metrics-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700)
    info = base.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return Path(tempfile.mkdtemp(prefix=f"ebb-metrics-{port}-"))  # someone else's: not ours to use
    directory = base / f"port-{port}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    return directory


def _remove_directory(directory: Path, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


class _TreeCollector(Collector):
    """The sum of every process's metric files, after dropping the live gauges of dead ones."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = MultiProcessCollector(None, str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for path in glob.glob(str(self.directory / "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            if not _alive(pid):
                mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
        collected: Iterable[Metric] = self.files.collect()  # type: ignore[no-untyped-call]
        return collected


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _on_worker_setup(**_: Any) -> None:
    """In the worker's main process once its logging is set up, before it forks its pool."""
    if _Served.settings is not None:
        serve(_Served.settings, "worker")


def _on_beat_init(**_: Any) -> None:
    """A beat of its own serves; one embedded in a worker (``-B``) records into the worker's."""
    if _Served.settings is None:
        return
    if _Served.pid is None:
        serve(_Served.settings, "beat")
    elif os.getpid() != _Served.pid:  # embedded: forked from the worker that serves
        _record_here("beat", start_at_zero=True)
    if metrics.enabled():
        after_task_publish.connect(_on_publish, weak=False, dispatch_uid="ebb-metrics-beat-sent")


def _on_publish(sender: Any = None, **_: Any) -> None:
    if sender == AUDIT_TASK_NAME:
        metrics.audit_sent()


def _on_pool_process_init(**_: Any) -> None:
    if metrics.enabled() and os.getpid() != _Served.pid:
        _record_here("worker", start_at_zero=False)


def _on_pool_process_exit(**_: Any) -> None:
    if metrics.enabled() and _Served.directory is not None and os.getpid() != _Served.pid:
        with contextlib.suppress(OSError):
            mark_process_dead(os.getpid(), str(_Served.directory))  # type: ignore[no-untyped-call]


def _on_task_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """A job task that ended without its result (it raised): no longer running."""
    if task_id and getattr(sender, "name", None) == contract.TASK_NAME:
        metrics.job_left(task_id)
