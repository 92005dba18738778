"""The command group, exit codes, and turning errors into one clear line each."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn, ParamSpec, TypeVar

import click

from sdk.errors import (
    BrokerUnavailableError,
    JobQueuesExpiredError,
    UnknownJobError,
    UnknownWorkflowError,
)
from sdk.registry import RegistryUnavailableError
from tasks.broker_api import ManagementError

P = ParamSpec("P")
R = TypeVar("R")

#: Exit codes a script can rely on.
EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job ended ERROR, CANCELLED or TIMEOUT
EXIT_BAD_INPUT = 2  # also click's own usage errors
EXIT_EXPIRED = 3  # the job's queues expired, or the job is unknown
EXIT_UNREACHABLE = 4  # RabbitMQ, its management API or Redis cannot be reached
EXIT_DETACHED = 5  # Ctrl-C before the result: the job goes on, reconnect with ebb watch

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 job failed (ERROR/CANCELLED/TIMEOUT), 2 bad input, 3 queues expired or "
    "job unknown, 4 broker/Redis unreachable, 5 detached with Ctrl-C."
)


@click.group(epilog=EXIT_CODES_HELP)
def main() -> None:
    """Ebb: Celery jobs whose per-job RabbitMQ queues clean themselves up."""


def fail(code: int, message: str, *, as_json: bool = False) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"event": "error", "exit_code": code, "message": message}))
    click.echo(f"ebb: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Map the SDK's precise errors onto exit codes, with their message and no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except (JobQueuesExpiredError, UnknownJobError) as exc:
            fail(EXIT_EXPIRED, str(exc), as_json=as_json)
        except (BrokerUnavailableError, RegistryUnavailableError, ManagementError, ConnectionError) as exc:
            fail(EXIT_UNREACHABLE, str(exc), as_json=as_json)
        except (UnknownWorkflowError, ValueError, TypeError) as exc:
            fail(EXIT_BAD_INPUT, str(exc), as_json=as_json)

    return wrapper


_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$"
)


class Duration(click.ParamType[timedelta]):
    """``90``, ``90s``, ``10m``, ``2h``, ``1d``, ``1h30m``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value))
        if not match or not any(match.groups()):
            self.fail(f"{value!r} is not a duration; write e.g. 90s, 10m, 2h or 1d", param, ctx)
        days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def parse_params(pairs: tuple[str, ...], params_file: str | None) -> dict[str, Any]:
    """``--params-file`` (a JSON object) first, then each ``--param k=v`` (v read as JSON if it is)."""
    params: dict[str, Any] = {}
    if params_file:
        try:
            with open(params_file, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(
                f"cannot read {params_file} as JSON: {exc}", param_hint="--params-file"
            ) from None
        if not isinstance(loaded, dict):
            raise click.BadParameter("must hold a JSON object", param_hint="--params-file")
        params.update(loaded)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params
