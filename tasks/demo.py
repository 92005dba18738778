"""Demo workflows shipped with every worker."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from tasks.workflows import Progress, workflow

logger = logging.getLogger("ebb.demo")


@workflow("demo.sleep", params=("seconds", "steps"))
def sleep(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Sleep ``seconds`` in ``steps`` equal steps, reporting progress after each."""
    seconds = float(params.get("seconds", 1.0))
    steps = int(params.get("steps", 1))
    if seconds < 0 or steps < 1:
        raise ValueError(f"demo.sleep needs seconds >= 0 and steps >= 1, got {seconds}, {steps}")
    for step in range(1, steps + 1):
        time.sleep(seconds / steps)
        progress(step / steps, f"step {step}/{steps}")
    return {"slept": params.get("seconds", 1.0)}


@workflow("demo.blob", params=("bytes",))
def blob(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Return a string of ``bytes`` characters: a large result from small params, to try limits."""
    size = int(params.get("bytes", 1024))
    if size < 0:
        raise ValueError(f"demo.blob needs bytes >= 0, got {size}")
    return {"blob": "x" * size}


@workflow("demo.fail", params=("message",))
def fail(params: dict[str, Any], progress: Progress) -> None:
    """Always raise, with the given message: for trying out ERROR results."""
    logger.warning("about to fail on purpose")
    raise RuntimeError(str(params.get("message", "demo.fail was asked to fail")))


@workflow("demo.echo", params=("*",))
def echo(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Return the params unchanged: the cheapest possible job, for benchmarks and smoke tests."""
    progress(1.0, "echoed")
    return params


@workflow("demo.stubborn", params=("seconds",))
def stubborn(params: dict[str, Any], progress: Progress) -> str:
    """Sleep without reporting and swallow every ``Exception``: cancel and timeout must still work."""
    deadline = time.monotonic() + float(params.get("seconds", 30))
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            time.sleep(0.1)
    return "finished"
