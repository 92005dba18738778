"""Demo workflows shipped with every worker; all but demo.echo declare typed params."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.workflows import Progress, workflow

logger = logging.getLogger("ebb.demo")


class DemoParams(BaseModel):
    """Unknown params are refused (at submit, from the schema), so typos do not go unnoticed."""

    model_config = ConfigDict(extra="forbid")


class SleepParams(DemoParams):
    seconds: float = Field(1.0, ge=0, description="How long to sleep in all")
    steps: int = Field(1, ge=1, le=10_000, description="Progress reports, evenly spaced")


@workflow("demo.sleep", params=SleepParams)
def sleep(params: SleepParams, progress: Progress) -> dict[str, Any]:
    """Sleep ``seconds`` in ``steps`` equal steps, reporting progress after each."""
    for step in range(1, params.steps + 1):
        time.sleep(params.seconds / params.steps)
        progress(step / params.steps, f"step {step}/{params.steps}")
    return {"slept": params.seconds}


class BlobParams(DemoParams):
    bytes: int = Field(1024, ge=0, description="Length of the returned string")


@workflow("demo.blob", params=BlobParams)
def blob(params: BlobParams, progress: Progress) -> dict[str, Any]:
    """Return a string of ``bytes`` characters: a large result from small params, to try limits."""
    return {"blob": "x" * params.bytes}


class FailParams(DemoParams):
    message: str = Field("demo.fail was asked to fail", description="The error's message")


@workflow("demo.fail", params=FailParams)
def fail(params: FailParams, progress: Progress) -> None:
    """Always raise, with the given message: for trying out ERROR results."""
    logger.warning("about to fail on purpose")
    raise RuntimeError(params.message)


@workflow("demo.echo", params=("*",))
def echo(params: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Return the params unchanged: the cheapest possible job, for benchmarks and smoke tests."""
    progress(1.0, "echoed")
    return params


class StubbornParams(DemoParams):
    seconds: float = Field(30.0, ge=0, description="How long to ignore every exception")


@workflow("demo.stubborn", params=StubbornParams)
def stubborn(params: StubbornParams, progress: Progress) -> str:
    """Sleep without reporting and swallow every ``Exception``: cancel and timeout must still work."""
    deadline = time.monotonic() + params.seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            time.sleep(0.1)
    return "finished"
