"""A TCP proxy that tests can freeze, mute or kill: ``tcp_proxy.py TARGET_PORT [HOST [PORT]]``.

It prints the port it listens on (127.0.0.1), then forwards every connection to the target.
SIGSTOP freezes it (the connection goes half-open: no FIN, no RST, ever), SIGUSR1 stops
forwarding what the broker sends, SIGUSR2 does the same from the client's next ``basic.publish``
on (that frame still reaches the broker: the message arrives, its confirm never comes, whether
the client waited for its queue declares first or not), SIGKILL resets everything. It prints a
line once it has taken SIGUSR1 or SIGUSR2 ("muted", "muting at the next publish"): the handler
runs on the main thread, which a loaded machine may schedule only after a frame has gone by, so
a test waits for that line before it acts.

Two more modes cut one connection at a chosen frame, once; later connections (the client's
reconnect) are forwarded as before. ``RESET_AFTER_CONFIRM`` (SIGRTMIN): the broker's next
``basic.ack`` (a publisher confirm) reaches the client, nothing after it does, and the connection
is reset, so that the client learns of the break right after the confirm. ``RESET_AT_QUEUE_DELETE``
(SIGRTMIN+1): what the client sent before its next ``queue.delete`` reaches the broker, the delete
and nothing after it does, and the connection is reset. The cut: the last bytes forwarded leave
with a FIN in one segment (the peer reads them and the end in one go), then both sides get an
RST. Each mode prints a line once taken ("resetting after the next confirm", "resetting at the
next queue delete"), and one once it cut ("reset after a confirm", "reset at a queue delete").
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import socket
import struct
import sys
import threading
import time

muted = threading.Event()
mute_at_publish = threading.Event()

PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01", before the first frame
BASIC_PUBLISH = b"\x00\x3c\x00\x28"  # class 60, method 40
BASIC_ACK = b"\x00\x3c\x00\x50"  # class 60, method 80: a publisher confirm, from the broker
QUEUE_DELETE = b"\x00\x32\x00\x28"  # class 50, method 40

SIOCOUTQNSD = 0x894B  # Linux: bytes written to a TCP socket and not yet sent

RESET_AFTER_CONFIRM = signal.SIGRTMIN
RESET_AT_QUEUE_DELETE = signal.SIGRTMIN + 1
reset_after_confirm = threading.Event()
reset_at_queue_delete = threading.Event()


class PublishSpotter:
    """Follows the client's frames across reads; tells whether a chunk holds a basic.publish."""

    def __init__(self) -> None:
        self.skip = PROTOCOL_HEADER
        self.buffer = b""

    def has_publish(self, data: bytes) -> bool:
        found = False
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
        self.buffer += data
        while len(self.buffer) >= 7:
            end = 7 + int.from_bytes(self.buffer[3:7], "big") + 1
            if len(self.buffer) < end:
                break
            if self.buffer[0] == 1 and self.buffer[7:11] == BASIC_PUBLISH:  # a method frame
                found = True
            self.buffer = self.buffer[end:]
        return found


class MethodFrames:
    """Follows one direction's frames across reads: the method frames each chunk completes."""

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip  # bytes before the first frame (the client's protocol header)
        self.buffer = b""

    def completed(self, data: bytes) -> list[tuple[bytes, int, int]]:
        """(class and method id, start, end) of each method frame that ``data`` completes, as
        offsets into ``data``: ``start`` is negative for a frame begun in an earlier chunk."""
        found = []
        offset = 0  # where data[0] is, counted from the buffer's start
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            offset = -cut
            data = data[cut:]
        offset += len(self.buffer)
        self.buffer += data
        start = 0
        while len(self.buffer) - start >= 7:
            end = start + 7 + int.from_bytes(self.buffer[start + 3 : start + 7], "big") + 1
            if len(self.buffer) < end:
                break
            if self.buffer[start] == 1:  # a method frame
                found.append((self.buffer[start + 7 : start + 11], start - offset, end - offset))
            start = end
        self.buffer = self.buffer[start:]
        return found


class Link:
    """One client's connection and the proxy's to the broker for it."""

    def __init__(self, client: socket.socket, broker: socket.socket) -> None:
        self.client = client
        self.broker = broker
        self.was_reset = False

    def cut(self, target: socket.socket, last: bytes) -> None:
        """Forward ``last`` to ``target`` (the client or the broker), then reset both connections.

        ``last`` and a FIN leave in one segment, so the peer reads them in one go and sees the
        connection end right after them; then each side gets an RST.
        """
        self.was_reset = True  # before waking the other pump: its ending must not send a FIN
        with contextlib.suppress(OSError):
            target.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            target.sendall(last)
            target.shutdown(socket.SHUT_WR)
            target.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # out: ``last`` and the FIN
        for sock in (self.client, self.broker):
            _until_sent(sock)
        for sock in (self.client, self.broker):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # wakes the other pump's recv; sends nothing
        for sock in (self.client, self.broker):
            sock.close()  # with a zero linger: an RST


def _until_sent(sock: socket.socket, bound: float = 2.0) -> None:
    """Until all we wrote has gone out (an RST discards what has not), not until the peer
    acknowledged it: the reset follows the last bytes at once, as on a real break."""
    deadline = time.monotonic() + bound
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            unsent = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, struct.pack("i", 0))
            if struct.unpack("i", unsent)[0] == 0:
                return
            time.sleep(0.001)


def pump(source: socket.socket, target: socket.socket, *, from_broker: bool, link: Link) -> None:
    spotter = None if from_broker else PublishSpotter()
    frames = MethodFrames() if from_broker else MethodFrames(PROTOCOL_HEADER)
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if from_broker and muted.is_set():
                continue
            if spotter is not None and spotter.has_publish(data) and mute_at_publish.is_set():
                muted.set()  # before the publish goes on: the broker's confirm cannot get back
            cut = _cut_at(frames.completed(data), from_broker=from_broker)
            if cut is not None:
                link.cut(target, data[: max(cut, 0)])
                print("reset after a confirm" if from_broker else "reset at a queue delete", flush=True)
                return
            target.sendall(data)
    except OSError:
        pass
    finally:
        if not link.was_reset:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _cut_at(methods: list[tuple[bytes, int, int]], *, from_broker: bool) -> int | None:
    """Where an armed reset cuts this chunk (what goes on before the reset), if it does; disarms it."""
    for method, start, end in methods:
        if from_broker and method == BASIC_ACK and reset_after_confirm.is_set():
            reset_after_confirm.clear()
            return end  # the confirm goes on, nothing after it
        if not from_broker and method == QUEUE_DELETE and reset_at_queue_delete.is_set():
            reset_at_queue_delete.clear()
            return start  # the delete never goes on (begun in an earlier chunk: never completed)
    return None


def _mute() -> None:
    muted.set()
    print("muted", flush=True)


def _mute_at_publish() -> None:
    mute_at_publish.set()
    print("muting at the next publish", flush=True)


def _reset_after_confirm() -> None:
    reset_after_confirm.set()
    print("resetting after the next confirm", flush=True)


def _reset_at_queue_delete() -> None:
    reset_at_queue_delete.set()
    print("resetting at the next queue delete", flush=True)


def main() -> None:
    target_port = int(sys.argv[1])
    target_host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    signal.signal(signal.SIGUSR1, lambda *_: _mute())
    signal.signal(signal.SIGUSR2, lambda *_: _mute_at_publish())
    signal.signal(RESET_AFTER_CONFIRM, lambda *_: _reset_after_confirm())
    signal.signal(RESET_AT_QUEUE_DELETE, lambda *_: _reset_at_queue_delete())
    listen_port = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # a fixed port, to restart it on
    listener = socket.create_server(("127.0.0.1", listen_port))
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        try:
            broker = socket.create_connection((target_host, target_port))
        except OSError:  # the target is down (restarting): this client is refused, the proxy stays
            client.close()
            continue
        link = Link(client, broker)
        threading.Thread(
            target=pump, args=(client, broker), kwargs={"from_broker": False, "link": link}, daemon=True
        ).start()
        threading.Thread(
            target=pump, args=(broker, client), kwargs={"from_broker": True, "link": link}, daemon=True
        ).start()


if __name__ == "__main__":
    main()
