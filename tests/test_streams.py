"""Sources read in threads of their own and handed over in batches (no broker needed).

The audit reads every cluster node's queue listing at once through ``in_batches``: a queue lost
or counted twice would be a wrong verdict, a node's error swallowed would pass a partial audit
off as a whole one, an audit that gives up must not leave threads reading the broker for ever,
and a slow node's queues must reach the audit while that node is still rendering the rest.
Every wait here has a deadline, so a broken ``in_batches`` fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TypeVar

import pytest

from tasks.streams import in_batches

R = TypeVar("R")

#: Longest any step may take before the test calls it hung.
DEADLINE = 2.0


def within(seconds: float, work: Callable[[], R]) -> R:
    """``work()``'s result or its exception; a failed test if it takes longer than ``seconds``."""
    outcome: list[R] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds} s")
    if errors:
        raise errors[0]
    return outcome[0]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE} s: {what}")
        time.sleep(0.005)


def test_every_item_of_every_source_arrives_once_in_batches_no_larger_than_asked() -> None:
    name = f"test-streams-{uuid.uuid4()}"
    threads: list[tuple[str, bool]] = []

    def source(start: int, count: int) -> Callable[[], Iterable[int]]:
        def items() -> Iterator[int]:
            threads.append((threading.current_thread().name, threading.current_thread().daemon))
            yield from range(start, start + count)

        return items

    sizes = [0, 1, 7, 50, 333]  # empty, smaller than a batch, exactly one, not a multiple of it
    sources = [source(i * 1000, n) for i, n in enumerate(sizes)]
    batches = within(DEADLINE, lambda: list(in_batches(sources, 7, name=name)))

    arrived = Counter(item for batch in batches for item in batch)
    expected = Counter(i * 1000 + k for i, n in enumerate(sizes) for k in range(n))
    assert arrived == expected, "every item exactly once, none invented"
    assert all(1 <= len(batch) <= 7 for batch in batches), [len(b) for b in batches]
    assert len(batches) <= sum(-(-n // 7) for n in sizes), "batches are filled, not one per item"
    assert threads == [(name, True)] * len(sizes), "each source in a daemon thread of the given name"
    assert within(DEADLINE, lambda: list(in_batches([], 7, name=name))) == []


class NodeDown(Exception):
    """What one source raises."""


def test_a_sources_error_reaches_the_consumer_as_it_was_raised() -> None:
    raised = NodeDown("rabbit@b stopped answering")

    def healthy() -> Iterator[int]:
        yield from range(100)

    def failing() -> Iterator[int]:
        yield from range(5)
        raise raised

    with pytest.raises(NodeDown) as caught:
        within(DEADLINE, lambda: list(in_batches([healthy, failing, healthy], 3, name="test-streams")))
    assert caught.value is raised


def test_a_consumer_that_stops_early_stops_an_endless_source() -> None:
    name = f"test-streams-{uuid.uuid4()}"
    produced = [0]
    stopped = threading.Event()

    def endless() -> Iterator[int]:
        try:
            while True:
                produced[0] += 1
                yield produced[0]
        finally:  # the thread let go of it: closed, or collected once the thread returned
            stopped.set()

    batches = in_batches([endless], 10, name=name)
    assert isinstance(batches, Generator), "a consumer must be able to close it"
    first = within(DEADLINE, lambda: next(batches))
    assert first == list(range(1, 11))
    batches.close()

    wait_until(stopped.is_set, "the endless source was left alone")
    wait_until(lambda: not any(t.name == name for t in threading.enumerate()), "the source's thread ended")
    after = produced[0]
    time.sleep(0.05)
    assert produced[0] == after, "the source kept being read after the consumer stopped"


def test_a_slow_sources_items_are_handed_out_before_it_ends() -> None:
    blocked = threading.Event()
    release = threading.Event()
    ended = threading.Event()

    def slow() -> Iterator[str]:
        yield "a"
        yield "b"
        blocked.set()
        if not release.wait(DEADLINE):
            raise TimeoutError("never released")
        yield "c"
        ended.set()

    batches = in_batches([slow], 2, name="test-streams")
    first = within(DEADLINE, lambda: next(batches))
    assert first == ["a", "b"]
    wait_until(blocked.is_set, "the source went on to its next item")
    assert not ended.is_set(), "the first batch must come while the source is still running"

    release.set()
    rest = within(DEADLINE, lambda: list(batches))
    assert rest == [["c"]], "the last, partial batch is handed out when the source ends"
    assert ended.is_set()
