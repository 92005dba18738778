"""A TCP proxy in front of RabbitMQ that tests can freeze, mute or kill: ``tcp_proxy.py TARGET_PORT``.

It prints the port it listens on (127.0.0.1), then forwards every connection to the target.
SIGSTOP freezes it (the connection goes half-open: no FIN, no RST, ever), SIGUSR1 stops
forwarding what the broker sends (a confirm that never comes), SIGKILL resets everything.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

muted = threading.Event()


def pump(source: socket.socket, target: socket.socket, *, from_broker: bool) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if from_broker and muted.is_set():
                continue
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def main() -> None:
    target_port = int(sys.argv[1])
    signal.signal(signal.SIGUSR1, lambda *_: muted.set())
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        broker = socket.create_connection(("127.0.0.1", target_port))
        threading.Thread(
            target=pump, args=(client, broker), kwargs={"from_broker": False}, daemon=True
        ).start()
        threading.Thread(
            target=pump, args=(broker, client), kwargs={"from_broker": True}, daemon=True
        ).start()


if __name__ == "__main__":
    main()
