"""Stopping a running workflow from outside: cancellation (via the registry) and timeouts.

A watcher thread in each worker process looks at the job it is running twice a second. When
the job was cancelled or ran past its timeout it signals its own process (SIGUSR2); the handler
raises :class:`JobInterrupted` in the workflow's thread, which also breaks out of ``time.sleep``
and blocking I/O. The exception is raised only while the workflow itself runs, never while
the task is publishing, so a half-sent message is impossible: the workflow's progress reports
publish inside :meth:`Interrupter.deferred`, where a signal only marks the interrupt as due.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import redis

from ebb.contract import JobStatus
from ebb.logfmt import log_event
from ebb.registry import Registry

logger = logging.getLogger("ebb.worker")
POLL_INTERVAL = 0.5
SIGNAL = signal.SIGUSR2


class JobInterrupted(BaseException):
    """Raised inside a workflow that was cancelled or timed out; ``status`` says which."""

    def __init__(self, status: JobStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class _Running:
    job_id: uuid.UUID
    deadline: float | None
    timeout: float | None
    thread: int = 0  # the workflow's thread, the one the signal handler interrupts
    reason: JobInterrupted | None = None
    armed: bool = False
    deferring: int = 0  # > 0 while that thread publishes: the interrupt waits for the block's end


class Interrupter:
    """One per worker process: watches the job that process is running."""

    _instance: Interrupter | None = None
    _pid = 0

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._running: _Running | None = None
        self._lock = threading.Lock()
        signal.signal(SIGNAL, self._on_signal)
        threading.Thread(target=self._watch, name="ebb-interrupter", daemon=True).start()

    @classmethod
    def for_process(cls, registry: Registry) -> Interrupter:
        if cls._instance is None or cls._pid != os.getpid():
            cls._instance = cls(registry)
            cls._pid = os.getpid()
        return cls._instance

    @contextmanager
    def running(self, job_id: uuid.UUID, timeout: float | None) -> Iterator[None]:
        """Inside this block the workflow may be interrupted; outside it, never."""
        deadline = time.monotonic() + timeout if timeout else None
        state = _Running(job_id, deadline, timeout, threading.get_ident(), armed=True)
        with self._lock:
            self._running = state
        # No wake-up here: the job's start already read its cancellation flag (registry), so
        # the watcher's next poll (within POLL_INTERVAL) is soon enough, and a short job costs
        # Redis nothing more.
        try:
            yield
            if state.reason is not None:  # decided just as the workflow returned: honour it
                raise state.reason
        finally:
            with self._lock:
                state.armed = False
                self._running = None

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside this block an interrupt waits, and is raised as the block ends.

        For the workflow's progress reports: raised inside py-amqp's socket I/O, the exception
        leaves the shared reply connection mid-frame (a frame header read and dropped, a confirm
        never read), and the job's final status then waits on that connection forever, its
        result never sent. Cancels seen just as a progress report goes out hit this: every one
        in a fresh worker process, whose watcher polls in step with a workflow reporting each
        whole second.
        """
        state = self._running
        if state is None or state.thread != threading.get_ident():
            yield  # not the workflow's thread: the signal never interrupts it anyway
            return
        state.deferring += 1
        try:
            yield
        finally:
            state.deferring -= 1
            if not state.deferring and state.armed and state.reason is not None:
                state.armed = False
                raise state.reason

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        state = self._running
        if state is not None and state.armed and state.reason is not None and not state.deferring:
            state.armed = False  # once is enough
            raise state.reason

    def _watch(self) -> None:
        while True:
            time.sleep(POLL_INTERVAL)
            state = self._running
            if state is None or state.reason is not None:
                continue
            reason = self._check(state)
            if reason is None:
                continue
            with self._lock:
                if self._running is not state or not state.armed:
                    continue
                state.reason = reason
            log_event(
                logger, logging.WARNING, "job_interrupting", job_id=state.job_id, status=reason.status.value
            )
            os.kill(os.getpid(), SIGNAL)

    def _check(self, state: _Running) -> JobInterrupted | None:
        if state.deadline is not None and time.monotonic() >= state.deadline:
            return JobInterrupted(
                JobStatus.TIMEOUT, f"the job ran longer than its job_timeout of {state.timeout:g} s"
            )
        try:
            if self._registry.cancel_requested(state.job_id):
                return JobInterrupted(JobStatus.CANCELLED, "the job was cancelled by cancel_job()")
        except redis.RedisError:
            pass  # registry down: cancellation waits until it is back; timeouts still work
        return None
