"""One thread owns the client's one AMQP connection; every other thread hands it work.

py-amqp connections are not thread-safe, and publishing from inside a delivery callback
recurses through py-amqp's frame reader. So deliveries only land in an inbox while frames
are read, and all publishing, acking and user callbacks happen between reads, on this thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from kombu.connection import Connection

from sdk.errors import ClientClosedError
from sdk.logfmt import log_event

T = TypeVar("T")
logger = logging.getLogger("ebb.sdk")


class BrokerLoop:
    """Runs commands and reads frames on a single thread until closed."""

    def __init__(
        self,
        connection: Connection,
        *,
        after_io: Callable[[], None],
        on_failure: Callable[[BaseException], None],
        tick: float = 0.25,
        name: str = "ebb-client",
    ) -> None:
        self.connection = connection
        self._after_io = after_io
        self._on_failure = on_failure
        self._tick = tick
        self._commands: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` on the loop thread and return its result (directly, when already on it)."""
        if self.on_loop_thread:
            return fn()
        if self.failure is not None or self._stopping:
            raise ClientClosedError(self._closed_reason())
        future: Future[T] = Future()
        self._commands.put((fn, future))
        self._wake()
        return future.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.on_loop_thread:
            raise RuntimeError("close() cannot be called from a callback; call it from your own thread")
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed, or full while the loop is awake anyway
            os.write(self._wake_w, b"x")

    def _closed_reason(self) -> str:
        if self.failure is not None:
            return f"the client lost its broker connection: {self.failure!r}"
        return "the client is closed"

    def _run(self) -> None:
        try:
            sock = self.connection.connection.sock
            while not self._stopping:
                readable, _, _ = select.select([sock, self._wake_r], [], [], self._tick)
                if self._wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                self._drain()
                self._run_commands()
                self._after_io()
                self.connection.heartbeat_check()
            self._run_commands()  # let work queued before close() finish
            self._after_io()
        except BaseException as exc:  # the connection is gone: fail loudly, never hang callers
            self.failure = exc
            log_event(logger, logging.ERROR, "connection_lost", error=repr(exc))
            self._on_failure(exc)
        finally:
            self._fail_pending_commands()

    def _drain(self) -> None:
        # py-amqp may hold whole frames in its buffer that select() cannot see: read until empty.
        while True:
            try:
                self.connection.drain_events(timeout=0)
            except TimeoutError:  # socket.timeout: nothing more to read
                return

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
                if _is_connection_error(self.connection, exc):
                    raise

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(ClientClosedError(self._closed_reason()))


def _is_connection_error(connection: Connection, exc: BaseException) -> bool:
    return isinstance(exc, tuple(connection.connection_errors))
