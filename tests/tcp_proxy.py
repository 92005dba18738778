"""A TCP proxy that tests can freeze, mute or kill: ``tcp_proxy.py TARGET_PORT [HOST [PORT]]``.

It prints the port it listens on (127.0.0.1), then forwards every connection to the target.
SIGSTOP freezes it (the connection goes half-open: no FIN, no RST, ever), SIGUSR1 stops
forwarding what the broker sends, SIGUSR2 does the same from the client's next ``basic.publish``
on (that frame still reaches the broker: the message arrives, its confirm never comes, whether
the client waited for its queue declares first or not), SIGKILL resets everything. It prints a
line once it has taken SIGUSR1 or SIGUSR2 ("muted", "muting at the next publish"): the handler
runs on the main thread, which a loaded machine may schedule only after a frame has gone by, so
a test waits for that line before it acts.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

muted = threading.Event()
mute_at_publish = threading.Event()

PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01", before the first frame
BASIC_PUBLISH = b"\x00\x3c\x00\x28"  # class 60, method 40


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


def pump(source: socket.socket, target: socket.socket, *, from_broker: bool) -> None:
    spotter = None if from_broker else PublishSpotter()
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if from_broker and muted.is_set():
                continue
            if spotter is not None and spotter.has_publish(data) and mute_at_publish.is_set():
                muted.set()  # before the publish goes on: the broker's confirm cannot get back
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _mute() -> None:
    muted.set()
    print("muted", flush=True)


def _mute_at_publish() -> None:
    mute_at_publish.set()
    print("muting at the next publish", flush=True)


def main() -> None:
    target_port = int(sys.argv[1])
    target_host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    signal.signal(signal.SIGUSR1, lambda *_: _mute())
    signal.signal(signal.SIGUSR2, lambda *_: _mute_at_publish())
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
        threading.Thread(
            target=pump, args=(client, broker), kwargs={"from_broker": False}, daemon=True
        ).start()
        threading.Thread(
            target=pump, args=(broker, client), kwargs={"from_broker": True}, daemon=True
        ).start()


if __name__ == "__main__":
    main()
