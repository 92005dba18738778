"""Iterators run in threads of their own and handed over in batches.

The audit's listing streams in for as long as RabbitMQ takes to render it (seconds per 100,000
queues): reading it in a thread lets the audit look up each batch's jobs in Redis while the
broker is still rendering the next, and lets every cluster node render its own queues at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class _Done:
    """One source ran out."""


class _Failed:
    """One source raised ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def in_batches(sources: Sequence[Callable[[], Iterable[T]]], size: int, *, name: str) -> Iterator[list[T]]:
    """Each source's items in lists of up to ``size``, each list handed out as soon as it is full,
    in no order across sources. Each source runs in a daemon thread named ``name``; the first
    error a source raises is raised here, and a consumer that stops early stops the sources at
    their next item."""
    handed: queue.SimpleQueue[list[T] | _Done | _Failed] = queue.SimpleQueue()
    stop = threading.Event()

    def run(source: Callable[[], Iterable[T]]) -> None:
        try:
            batch: list[T] = []
            for item in source():
                if stop.is_set():
                    return
                batch.append(item)
                if len(batch) >= size:
                    handed.put(batch)
                    batch = []
            if batch:
                handed.put(batch)
            handed.put(_Done())
        except BaseException as exc:  # handed to the consumer, which raises it
            handed.put(_Failed(exc))

    for source in sources:
        threading.Thread(target=run, args=(source,), name=name, daemon=True).start()
    running = len(sources)
    try:
        while running:
            item = handed.get()
            if isinstance(item, _Done):
                running -= 1
            elif isinstance(item, _Failed):
                raise item.error
            else:
                yield item
    finally:
        stop.set()
