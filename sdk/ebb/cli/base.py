"""The command group, exit codes, and turning errors into one clear line each.

The group holds the caller commands of this package and, imported only when one of them runs,
operator commands that other installed distributions add through the ``ebb.commands`` entry
point group (Ebb's service adds ``audit`` and ``demo``). So ``ebb submit`` never imports the
worker side, and a caller without it has a working ``ebb``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import Distribution, EntryPoint, entry_points
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

import click

from ebb.errors import (
    EbbError,
    JobQueuesExpiredError,
    UnavailableError,
    UnknownJobError,
    UnknownWorkflowError,
)
from ebb.params import coerce
from ebb.redact import redact
from ebb.workers import WorkflowInfo

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


PLUGIN_GROUP = "ebb.commands"


def _plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


def _distribution_root(dist: Distribution | None) -> Path | None:
    """Where a distribution's modules live: its source tree when installed editable (``pip -e``)."""
    if dist is None:
        return None
    try:
        info = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        info = None
    if isinstance(info, dict) and (info.get("dir_info") or {}).get("editable"):
        url = urlsplit(str(info.get("url", "")))
        if url.scheme == "file":
            return Path(unquote(url.path))
    return Path(str(dist.locate_file("")))


def load_plugin(ep: EntryPoint) -> click.Command:
    """Import an operator command from its own distribution, never from a same-named module of yours.

    A caller's project often has a ``tasks.py`` of its own on ``PYTHONPATH``; the distribution's
    root is put first on the path, and the module that gets imported is checked to come from it.
    """
    root = _distribution_root(ep.dist)
    if root is not None and (not sys.path or sys.path[0] != str(root)):
        sys.path.insert(0, str(root))
    top = ep.module.split(".")[0]
    try:
        command = ep.load()
    except Exception as exc:
        raise click.ClickException(
            f"'ebb {ep.name}' comes from {ep.dist.name if ep.dist else ep.module} and could not be "
            f"loaded ({exc!r}); reinstall it: pip install -e . from Ebb's repository"
        ) from exc
    origin = getattr(sys.modules.get(top), "__file__", None) or ""
    if root is not None and not Path(origin).resolve().is_relative_to(root.resolve()):
        raise click.ClickException(
            f"'ebb {ep.name}' needs Ebb's {top!r} package from {root}, but {top!r} is {origin}: "
            "run it without your own module of that name on PYTHONPATH"
        )
    if not isinstance(command, click.Command):
        raise click.ClickException(f"entry point {ep.value} is not a click command")
    return command


class EbbGroup(click.Group):
    """Caller commands, plus operator commands from ``ebb.commands`` entry points, loaded on use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        ep = _plugins().get(cmd_name)
        return load_plugin(ep) if ep is not None else None


@click.group(cls=EbbGroup, epilog=EXIT_CODES_HELP)
def main() -> None:
    """Ebb: Celery jobs whose per-job RabbitMQ queues clean themselves up."""


def fail(code: int, message: str, *, as_json: bool = False) -> NoReturn:
    message = redact(message)  # no password in anything the command prints
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
        except (UnavailableError, ConnectionError) as exc:
            fail(EXIT_UNREACHABLE, str(exc), as_json=as_json)
        except (UnknownWorkflowError, ValueError, TypeError) as exc:
            fail(EXIT_BAD_INPUT, str(exc), as_json=as_json)
        except EbbError as exc:
            fail(EXIT_JOB_FAILED, str(exc), as_json=as_json)

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


def parse_params(
    pairs: tuple[str, ...], params_file: str | None, workflow: WorkflowInfo | None = None
) -> dict[str, Any]:
    """``--params-file`` (a JSON object) first, then each ``--param k=v``.

    With the workflow's advertised schema, each ``v`` becomes the type its field wants
    (:func:`ebb.params.coerce`; a value that cannot be read is an ``InvalidParamsError``, exit
    2); without one, ``v`` is read as JSON if it parses and kept as text otherwise.
    """
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
    texts: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        texts[key] = raw
    schema = workflow.schema if workflow is not None and workflow.schema is not None else {}
    params.update(coerce(workflow.name if workflow else "", schema, texts))
    return params
