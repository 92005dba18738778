"""The synchronous transport's engine: one thread owns the client's one AMQP connection.

py-amqp connections are not thread-safe, and publishing from inside a delivery callback
recurses through py-amqp's frame reader. So deliveries only land in an inbox while frames are
read, and all publishing, acking and user callbacks happen between reads, on this thread.

Every wait is bounded. The loop never blocks on a confirm: publishes are settled as the
broker's acks arrive (:class:`Confirms`). The few waits that remain (a delete, opening channels)
are :meth:`BrokerLoop.rpc` calls that keep reading frames and checking heartbeats while they
wait. A connection from which no frame (not even a heartbeat) arrived for two heartbeat
intervals is declared dead, half-open or not, and replaced. Passive declares are
:class:`QueueProbes`, all of a job (or of every job, after a reconnect) at once: one that goes
unanswered (RabbitMQ 4 and a killed node's queue: ``ebb.broker_replies``) costs only its own
channel (:func:`abandon`), never the connection.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

import amqp
import amqp.exceptions
import kombu.exceptions
from amqp import spec
from kombu.connection import Connection

from ebb.acks import AckBatch
from ebb.broker_replies import PROBE_BATCH, Present, Probe, Unreachable, queue_unreachable
from ebb.errors import (
    BrokerUnavailableError,
    ClientClosedError,
    ClientUsageError,
    EbbError,
    broker_unavailable,
)
from ebb.logfmt import log_event
from ebb.redact import redact

T = TypeVar("T")
logger = logging.getLogger("ebb.client")


class ConnectionDead(ConnectionError):
    """No frame from the broker for two heartbeat intervals: the connection is gone, FIN or not."""


class BrokerTimeout(TimeoutError):
    """The broker did not answer within its bound; the connection is treated as broken."""


#: What means "this connection (or a channel we rely on) is broken": reconnect and resume.
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    amqp.exceptions.AMQPError,
    kombu.exceptions.OperationalError,
)


def listen_for_blocks(
    connection: amqp.Connection, on_blocked: Callable[[str], None], on_unblocked: Callable[[], None]
) -> None:
    """Hear RabbitMQ's ``connection.blocked`` (a resource alarm) with its reason, and the unblock.

    py-amqp reads the method without its argument (its reason, "low on memory") and calls its
    own handler; this reads the reason too and calls ours, on the thread that reads frames.
    """
    methods = dict(connection._METHODS)
    methods[spec.Connection.Blocked] = spec.method(spec.Connection.Blocked, "s")
    connection._METHODS = methods
    connection._callbacks[spec.Connection.Blocked] = lambda reason="": on_blocked(str(reason))
    connection._callbacks[spec.Connection.Unblocked] = lambda *_: on_unblocked()


class Confirms:
    """Publisher confirms of one channel, settled as the broker's acks arrive; nobody blocks on one.

    ``on_settled`` of a publish receives ``None`` when the broker took the message, or a reason:
    ``"returned"`` (mandatory and unroutable: RabbitMQ sends the return before the ack),
    ``"nacked"``, ``"timeout"`` or ``"connection lost"``.
    """

    def __init__(self, channel: amqp.Channel) -> None:
        self._channel = channel
        self._tags = itertools.count(1)
        self._waiting: dict[int, tuple[Callable[[str | None], None], float, str | None]] = {}
        self._returned: set[str] = set()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)

    def publish(
        self,
        message: amqp.Message,
        *,
        exchange: str,
        routing_key: str,
        mandatory: bool = False,
        on_settled: Callable[[str | None], None] | None = None,
        deadline: float = 0.0,
    ) -> None:
        tag = next(self._tags)
        self._channel.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        if on_settled is not None:
            self._waiting[tag] = (on_settled, deadline, message.properties.get("correlation_id"))

    def _settle(self, delivery_tag: int, multiple: bool, outcome: str | None) -> None:
        tags = (
            [t for t in itertools.takewhile(lambda t: t <= delivery_tag, self._waiting)] if multiple else []
        )
        if not multiple and delivery_tag in self._waiting:
            tags = [delivery_tag]
        for tag in tags:
            on_settled, _, correlation_id = self._waiting.pop(tag)
            returned = correlation_id is not None and correlation_id in self._returned
            if returned:
                self._returned.discard(str(correlation_id))
            on_settled("returned" if returned and outcome is None else outcome)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, "nacked")

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: amqp.Message) -> None:
        correlation_id = message.properties.get("correlation_id")
        if correlation_id is not None:
            self._returned.add(str(correlation_id))

    def expire(self, now: float) -> None:
        for tag, (on_settled, deadline, _) in list(self._waiting.items()):
            if deadline and now > deadline:
                del self._waiting[tag]
                on_settled("timeout")

    def fail_all(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for on_settled, _, _ in waiting.values():
            on_settled("connection lost")

    @property
    def outstanding(self) -> int:
        return len(self._waiting)


class Acks:
    """Acks of one py-amqp consuming channel, sent once per burst as ``AckBatch`` plans them."""

    def __init__(self, channel: amqp.Channel) -> None:
        self.channel = channel
        self._batch = AckBatch()

    def delivered(self, tag: int) -> None:
        self._batch.delivered(tag)

    def ack(self, tag: int) -> None:
        self._batch.ack(tag)

    def requeue(self, tag: int) -> None:
        self._batch.settled_otherwise(tag)
        self.channel.basic_reject(tag, requeue=True)

    def discard(self) -> None:
        """The channel is gone or going: its deliveries come again anyway."""
        self._batch.clear()

    def flush(self) -> None:
        plan = self._batch.take()
        if plan is None or not self.channel.is_open:
            return
        if plan.multiple_up_to is not None:
            self.channel.basic_ack(plan.multiple_up_to, multiple=True)
        for tag in plan.singles:
            self.channel.basic_ack(tag)


#: What a probe's channel answered, before it is judged: DeclareOk's ``(messages, consumers)``,
#: or a channel close's reply text.
_Answer = tuple[int, int] | str


def abandon(channel: amqp.Channel) -> None:
    """Give up on a channel whose request the broker does not answer (it is never used again).

    Nothing is sent now: RabbitMQ would read a close only once the request is done anyway. When
    the late answer comes, a close (a 404) is acknowledged and a DeclareOk closes the channel,
    neither raising (py-amqp raises a channel's close out of whatever read it, otherwise).
    """

    def on_close(*_: Any) -> None:
        with contextlib.suppress(*AMQP_ERRORS):
            channel.send_method(spec.Channel.CloseOk)
        channel.collect()

    def on_declare_ok(*_: Any) -> None:
        close_later(channel)

    channel._callbacks[spec.Channel.Close] = on_close
    channel._callbacks[spec.Queue.DeclareOk] = on_declare_ok


def close_later(channel: amqp.Channel) -> None:
    """Close a channel without waiting: its CloseOk, when it comes, frees it (py-amqp)."""
    if channel.connection is None or not channel.is_open or channel.is_closing:
        return
    channel._callbacks[spec.Channel.Close] = channel._on_close
    channel.is_closing = True  # py-amqp then ignores all but the close handshake
    with contextlib.suppress(*AMQP_ERRORS):
        channel.send_method(spec.Channel.Close, "BsBB", (0, "", 0, 0))


class QueueProbes:
    """Passive declares of many queues at once, each on a channel of its own, within one bound.

    A channel of its own per probe: a 404 closes its channel, and RabbitMQ 4 keeps a killed
    node's queue from answering for about a minute. Probes not answered within ``bound`` are
    abandoned (:func:`abandon`); if any was, the broker must still open a channel within
    ``broker_timeout`` (else the connection is broken, as for any unanswered request), and the
    unanswered queues are out of reach (``Unreachable(None)``). Channels that answered are kept
    for the next probes. ``read_until(done, bound)`` reads frames until ``done()`` or ``bound``.
    """

    IDLE = 4  # channels kept open between probes

    def __init__(
        self,
        open_channel: Callable[[], amqp.Channel],
        read_until: Callable[[Callable[[], bool], float], bool],
    ) -> None:
        self._open = open_channel
        self._read_until = read_until
        self._idle: list[amqp.Channel] = []

    def reset(self) -> None:
        """A new connection: the channels of the old one are gone."""
        self._idle.clear()

    def probe(self, names: list[str], bound: float) -> dict[str, Probe]:
        found: dict[str, Probe] = {}
        for start in range(0, len(names), PROBE_BATCH):
            found |= self._probe_batch(names[start : start + PROBE_BATCH], bound)
        return found

    def _channel(self) -> amqp.Channel:
        while self._idle:
            channel = self._idle.pop()
            if channel.is_open and channel.connection is not None and not channel.is_closing:
                return channel
        return self._open()

    def _probe_batch(self, names: list[str], bound: float) -> dict[str, Probe]:
        answers: dict[str, _Answer] = {}
        asked: dict[str, amqp.Channel] = {}
        try:
            for name in dict.fromkeys(names):
                channel = self._channel()
                asked[name] = channel
                _listen(channel, name, answers)
                channel.send_method(
                    spec.Queue.Declare, "BsbbbbbF", (0, name, True, False, False, False, False, {})
                )
            self._read_until(lambda: len(answers) == len(asked), bound)
        finally:
            for name, channel in asked.items():
                answer = answers.get(name)
                if answer is None:
                    abandon(channel)
                    continue
                _unlisten(channel)
                if isinstance(answer, tuple) and len(self._idle) < self.IDLE:
                    self._idle.append(channel)
                elif isinstance(answer, tuple):
                    close_later(channel)
        unanswered = [name for name in asked if name not in answers]
        if unanswered:  # the broker answers this, or the connection counts as broken
            self._idle.append(self._open())
        found: dict[str, Probe] = {}
        for name in asked:
            answer = answers.get(name)
            if answer is None:
                found[name] = Unreachable(None)
            elif isinstance(answer, tuple):
                found[name] = Present(*answer)
            else:
                found[name] = queue_unreachable(answer)
        return found


def _listen(channel: amqp.Channel, name: str, answers: dict[str, _Answer]) -> None:
    """Record the channel's answer to a passive declare of ``name`` instead of raising it."""

    def on_declare_ok(queue: str, messages: int, consumers: int) -> None:
        answers[name] = (int(messages), int(consumers))

    def on_close(reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        with contextlib.suppress(*AMQP_ERRORS):
            channel.send_method(spec.Channel.CloseOk)
        channel.collect()
        if reply_code != 404:  # not an answer about the queue (403, say): the caller's error
            raise amqp.exceptions.error_for_code(
                reply_code, reply_text, (class_id, method_id), amqp.exceptions.ChannelError
            )
        answers[name] = str(reply_text)

    channel._callbacks[spec.Queue.DeclareOk] = on_declare_ok
    channel._callbacks[spec.Channel.Close] = on_close


def _unlisten(channel: amqp.Channel) -> None:
    channel._callbacks.pop(spec.Queue.DeclareOk, None)
    channel._callbacks[spec.Channel.Close] = channel._on_close


class BrokerLoop:
    """Runs commands and reads frames on a single thread until closed; reconnects when cut off.

    ``on_connected`` runs on a fresh connection (first in ``start()``, then on the loop thread
    after every reconnect) to open channels and resume consuming; ``after_io`` after every
    read; ``on_tick`` at least every ``tick`` seconds (deadlines); ``on_lost`` when a
    connection broke (before reconnecting); ``on_failure`` once, when the loop gives up.
    """

    def __init__(
        self,
        connect: Callable[[], Connection],
        *,
        on_connected: Callable[[Connection, bool], None],
        after_io: Callable[[], None],
        on_lost: Callable[[BaseException], None],
        on_failure: Callable[[BaseException], None],
        on_tick: Callable[[], None],
        broker_timeout: float = 30.0,
        reconnect_timeout: float = 120.0,
        tick: float = 0.25,
        name: str = "ebb-client",
    ) -> None:
        self._connect = connect
        self._on_connected = on_connected
        self._after_io = after_io
        self._on_lost = on_lost
        self._on_failure = on_failure
        self._on_tick = on_tick
        self.broker_timeout = broker_timeout
        self._reconnect_timeout = reconnect_timeout
        self._tick = tick
        self._commands: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._reconnecting = False
        self._last_recv = -1
        self._last_recv_at = 0.0
        self.failure: BaseException | None = None
        self.connection: Connection | None = None
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Connect (on the caller's thread, so a failure is the caller's error) and start the loop."""
        self._wake_r, self._wake_w = os.pipe()
        try:
            os.set_blocking(self._wake_r, False)
            self.connection = self._connect()
            self._mark_alive()
            self._on_connected(self.connection, False)
        except BaseException:
            self._close_pipe()
            if self.connection is not None:
                with contextlib.suppress(Exception):
                    self.connection.collect()
            raise
        self._thread.start()

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[[Future[T]], None]) -> Future[T]:
        """Run ``fn(future)`` on the loop thread; ``fn`` (or a later event) resolves the future."""
        future: Future[T] = Future()
        if self.on_loop_thread:  # from a callback: run now; a broken connection shows at the next read
            self._run_one(lambda: fn(future), future)
            return future
        if self.failure is not None or self._stopping:
            raise ClientClosedError(self._closed_reason())
        if self._reconnecting:
            raise BrokerUnavailableError("the broker connection is down; the client is reconnecting")
        self._commands.put((lambda: fn(future), future))
        self._wake()
        if not self._thread.is_alive():  # the loop ended between the check and the put
            self._fail_pending_commands()
        return future

    def call(self, fn: Callable[[], T], what: str = "a broker request", timeout: float | None = None) -> T:
        """Run ``fn`` on the loop thread and return its result, within ``timeout`` (broker_timeout)."""
        if self.on_loop_thread:
            return fn()

        def run(future: Future[T]) -> None:
            future.set_result(fn())

        future = self.submit(run)
        return self.result(future, what, timeout)

    def result(self, future: Future[T], what: str, timeout: float | None = None) -> T:
        """Wait for ``future`` at most ``timeout`` (default: broker_timeout plus a margin)."""
        bound = (self.broker_timeout + 1.0) if timeout is None else timeout
        if self.on_loop_thread:
            self._pump(future, bound)
        try:
            return future.result(0 if self.on_loop_thread else bound)
        except FutureTimeout:
            raise BrokerUnavailableError(f"{what}: no answer from RabbitMQ within {bound:g} s") from None

    def _pump(self, future: Future[Any], bound: float) -> None:
        """Read frames on the loop thread itself (called from a callback) until ``future`` is done."""
        assert self.connection is not None
        deadline = time.monotonic() + bound
        while not future.done() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=self._tick)
            self._check_alive()
            self._on_tick()

    def rpc(self, send: Callable[[], None], channel: amqp.Channel, replies: Any, what: str) -> Any:
        """On the loop thread: ``send()`` a method, then wait for one of ``replies`` on ``channel``.

        Frames keep being read (deliveries land in the inbox) and heartbeats checked while it
        waits; past ``broker_timeout`` it raises :class:`BrokerTimeout`, and the connection is
        replaced, since a late answer would confuse the next waiter.
        """
        assert self.connection is not None
        send()
        deadline = time.monotonic() + self.broker_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerTimeout(f"RabbitMQ did not answer {what} within {self.broker_timeout:g} s")
            try:
                return channel.wait(replies, timeout=min(self._tick, remaining), returns_tuple=True)
            except TimeoutError:
                self._check_alive()

    def read_until(self, done: Callable[[], bool], bound: float) -> bool:
        """On the loop thread: read frames (deliveries land in the inbox, heartbeats are checked)
        until ``done()`` or ``bound`` seconds passed; whether ``done()``."""
        assert self.connection is not None
        deadline = time.monotonic() + bound
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=min(self._tick, remaining))
            self._check_alive()
        return True

    @contextlib.contextmanager
    def bounded(self) -> Any:
        """Socket reads inside this block time out after ``broker_timeout`` (py-amqp's own waits)."""
        assert self.connection is not None
        with self.connection.connection.transport.having_timeout(self.broker_timeout):
            yield

    def stop(self, timeout: float = 10.0) -> None:
        if self.on_loop_thread:
            raise ClientUsageError("close() cannot be called from a callback; call it from your own thread")
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed, or full while the loop is awake anyway
            os.write(self._wake_w, b"x")

    def _closed_reason(self) -> str:
        if self.failure is not None:
            return f"the client lost its broker connection for good: {self.failure!r}"
        return "the client is closed"

    def _mark_alive(self) -> None:
        assert self.connection is not None
        self._last_recv = self.connection.connection.bytes_recv
        self._last_recv_at = time.monotonic()

    def _check_alive(self) -> None:
        """Send our heartbeats; declare the connection dead after two silent heartbeat intervals."""
        assert self.connection is not None
        conn = self.connection.connection
        received = conn.bytes_recv
        now = time.monotonic()
        if received != self._last_recv:
            self._last_recv, self._last_recv_at = received, now
        elif conn.heartbeat and now - self._last_recv_at > 2 * conn.heartbeat:
            raise ConnectionDead(
                f"no frame from RabbitMQ for {now - self._last_recv_at:.1f} s "
                f"(heartbeat {conn.heartbeat} s): the connection is dead or half-open"
            )
        self.connection.heartbeat_check()

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
            self._on_tick()
            self._check_alive()

    def _reconnect(self, cause: BaseException) -> None:
        """Reconnect with backoff until ``reconnect_timeout``; then give up for good."""
        self._reconnecting = True
        log_event(logger, logging.WARNING, "connection_lost", error=repr(cause), action="reconnecting")
        self._fail_pending_commands(broker_unavailable(cause, "the broker connection was lost"))
        self._on_lost(cause)
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.collect()
        deadline = time.monotonic() + self._reconnect_timeout
        delay = 0.25
        while not self._stopping:
            try:
                connection = self._connect()
                self.connection = connection
                self._mark_alive()
                self._on_connected(connection, True)
            except AMQP_ERRORS as exc:
                if self.connection is not None:
                    with contextlib.suppress(Exception):
                        self.connection.collect()
                if time.monotonic() > deadline:
                    raise BrokerUnavailableError(
                        f"could not reconnect to the broker within {self._reconnect_timeout:.0f} s: "
                        f"{redact(repr(exc))}"
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
            except TimeoutError:  # nothing more to read
                return

    def _run_one(self, fn: Callable[[], Any], future: Future[Any]) -> BaseException | None:
        """Run one command; the exception that broke the connection, if one did."""
        if not future.set_running_or_notify_cancel():
            return None
        try:
            fn()
        except BaseException as exc:
            if not future.done():
                broker = isinstance(exc, AMQP_ERRORS) and not isinstance(exc, EbbError)
                future.set_exception(
                    broker_unavailable(exc, "RabbitMQ failed the request") if broker else exc
                )
            if _connection_broken(exc):
                return exc
            if not isinstance(exc, Exception):
                raise
        return None

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except Empty:
                return
            broken = self._run_one(fn, future)
            if broken is not None:
                raise broken

    def _fail_pending_commands(self, error: BaseException | None = None) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error or ClientClosedError(self._closed_reason()))


def _connection_broken(exc: BaseException) -> bool:
    """After a failed command: is the connection gone (reconnect), or only that call's channel?"""
    if isinstance(exc, EbbError):
        return False
    if isinstance(exc, amqp.exceptions.ChannelError):
        return False  # the caller gets the error; its channel is reopened on demand
    return isinstance(exc, AMQP_ERRORS)
