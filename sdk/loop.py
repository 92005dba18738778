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
import time
from collections.abc import Callable
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

import amqp.exceptions
import kombu.exceptions
from kombu.connection import Connection

from sdk.errors import BrokerUnavailableError, ClientClosedError, EbbError
from sdk.logfmt import log_event

T = TypeVar("T")
logger = logging.getLogger("ebb.sdk")


class BrokerLoop:
    """Runs commands and reads frames on a single thread until closed; reconnects when cut off.

    ``on_connected`` runs on a fresh connection (first in ``start()``, then on the loop thread
    after every reconnect) to open channels and resume consuming.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        on_connected: Callable[[Connection, bool], None],
        after_io: Callable[[], None],
        on_failure: Callable[[BaseException], None],
        reconnect_timeout: float = 120.0,
        tick: float = 0.25,
        name: str = "ebb-client",
    ) -> None:
        self._connect = connect
        self._on_connected = on_connected
        self._after_io = after_io
        self._on_failure = on_failure
        self._reconnect_timeout = reconnect_timeout
        self._tick = tick
        self._commands: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        self._reconnecting = False
        self.failure: BaseException | None = None
        self.connection: Connection | None = None
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.connection = self._connect()
        self._on_connected(self.connection, False)
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
        if self._reconnecting:
            raise BrokerUnavailableError("the broker connection is down; the client is reconnecting")
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
            return f"the client lost its broker connection for good: {self.failure!r}"
        return "the client is closed"

    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._serve()
                except AMQP_ERRORS as exc:
                    if self._stopping:
                        break
                    self._reconnect(exc)
            self._run_commands()  # let work queued before close() finish
            self._after_io()
        except BaseException as exc:  # fail loudly, never leave callers hanging
            self.failure = exc
            log_event(logger, logging.ERROR, "connection_failed", error=repr(exc))
            self._on_failure(exc)
        finally:
            self._fail_pending_commands()

    def _serve(self) -> None:
        assert self.connection is not None
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

    def _reconnect(self, cause: BaseException) -> None:
        """Reconnect with backoff until ``reconnect_timeout``; then give up for good."""
        self._reconnecting = True
        log_event(logger, logging.WARNING, "connection_lost", error=repr(cause), action="reconnecting")
        self._fail_pending_commands(BrokerUnavailableError(f"the broker connection was lost: {cause!r}"))
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.collect()
        deadline = time.monotonic() + self._reconnect_timeout
        delay = 0.25
        while not self._stopping:
            try:
                connection = self._connect()
                self.connection = connection
                self._on_connected(connection, True)
            except AMQP_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise BrokerUnavailableError(
                        f"could not reconnect to the broker within {self._reconnect_timeout:.0f} s: {exc!r}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 3.0)
                continue
            self.reconnects += 1
            self._reconnecting = False
            log_event(logger, logging.WARNING, "connection_restored", reconnects=self.reconnects)
            return

    def _drain(self) -> None:
        assert self.connection is not None
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
                if _connection_broken(exc):
                    raise

    def _fail_pending_commands(self, error: BaseException | None = None) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error or ClientClosedError(self._closed_reason()))


#: What means "this connection (or a channel we rely on) is broken": reconnect and resume.
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    amqp.exceptions.AMQPError,
    kombu.exceptions.OperationalError,
)


def _connection_broken(exc: BaseException) -> bool:
    """After a failed command: is the connection gone (reconnect), or only that call's channel?"""
    if isinstance(exc, EbbError):
        return False
    if isinstance(exc, amqp.exceptions.ChannelError):
        return False  # the caller gets the error; its channel is reopened on demand
    return isinstance(exc, AMQP_ERRORS)
