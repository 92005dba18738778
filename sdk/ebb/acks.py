"""Which acks to send for a burst of settled deliveries: one multiple-ack where it can, no I/O.

RabbitMQ pays per ack frame, so both clients collect the acks of one burst of work and send
them at its end: one ``basic.ack(multiple=True)`` covers every tag below the oldest delivery
still unsettled (a result waiting for its stragglers, say); the tags above it go one by one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AckPlan:
    """What to send: ``multiple_up_to`` as one multiple-ack (if set), then each of ``singles``."""

    multiple_up_to: int | None
    singles: tuple[int, ...]


class AckBatch:
    """The delivery tags of one consuming channel: unsettled ones, and acks not sent yet."""

    def __init__(self) -> None:
        self._open: set[int] = set()
        self._done: list[int] = []

    def delivered(self, tag: int) -> None:
        self._open.add(tag)

    def ack(self, tag: int) -> None:
        """Settled by an ack: sent with the next ``take()``."""
        self._open.discard(tag)
        self._done.append(tag)

    def settled_otherwise(self, tag: int) -> None:
        """Settled by a reject (sent at once by the caller): no longer holds the multiple-ack back."""
        self._open.discard(tag)

    def clear(self) -> None:
        """The channel is gone: its deliveries come again on the next one."""
        self._open.clear()
        self._done.clear()

    @property
    def pending(self) -> int:
        """Acks waiting to be sent."""
        return len(self._done)

    def take(self) -> AckPlan | None:
        """The acks to send now (``None``: nothing to send), forgetting them."""
        if not self._done:
            return None
        done, self._done = self._done, []
        oldest_open = min(self._open, default=None)
        below = [t for t in done if oldest_open is None or t < oldest_open]
        above = tuple(t for t in done if oldest_open is not None and t > oldest_open)
        return AckPlan(max(below) if below else None, above)
