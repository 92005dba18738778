"""Which workflows the running workers can run, as they advertise it in Redis.

Each worker keeps ``ebb:workers:<vhost>:<hostname>`` alive (30 s expiry, refreshed every 10 s)
with the vhost and task queue it reads and its workflows, so a caller can list them and refuse at
once a workflow nobody runs, before any queue is declared. Deployments in two vhosts of one broker
may share a Redis, a task queue name and even worker host names: neither sees the other's adverts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import redis

from ebb import links
from ebb.config import Settings
from ebb.errors import RegistryUnavailableError, UnknownWorkflowError
from ebb.logfmt import log_event
from ebb.params import ParamInfo, apply, describe, usable
from ebb.records import WORKERS_KEY_PREFIX
from ebb.redact import redact

logger = logging.getLogger("ebb.client")
ADVERTISE_EVERY = 10.0
ADVERTISE_EXPIRY = 30


@dataclass(frozen=True)
class WorkflowInfo:
    """A workflow as its live workers advertise it."""

    name: str
    description: str
    #: Its parameters' names (``("*",)``: any).
    params: tuple[str, ...]
    workers: int
    #: The JSON Schema of its params, from its pydantic model; ``None`` for an untyped workflow.
    schema: dict[str, Any] | None = None

    def parameters(self) -> list[ParamInfo]:
        """Each parameter's type, default and whether it is required (empty when untyped)."""
        return describe(self.schema)

    def check(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with defaults filled in; :class:`ebb.InvalidParamsError` if they do not fit."""
        return dict(params) if self.schema is None else apply(self.name, self.schema, params)


def advert_key(vhost: str, hostname: str) -> str:
    """A worker's advert key: per vhost, so same-named workers of two vhosts never overwrite each other."""
    return f"{WORKERS_KEY_PREFIX}{quote(vhost, safe='')}:{hostname}"


def advertisement(hostname: str, queue: str, workflows: list[dict[str, Any]], vhost: str = "/") -> str:
    return json.dumps(
        {"hostname": hostname, "vhost": vhost, "queue": queue, "workflows": workflows, "at": time.time()}
    )


def list_workflows(client: redis.Redis, queue: str, vhost: str = "/") -> list[WorkflowInfo]:
    """Workflows advertised by live workers reading ``queue`` in ``vhost`` (an advert without a
    vhost is for ``/``); raises ``redis.RedisError``."""
    keys = list(client.scan_iter(match=f"{WORKERS_KEY_PREFIX}*", count=500))
    if not keys:
        return []
    found: dict[str, WorkflowInfo] = {}
    for raw in client.mget(keys):
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            continue
        if not isinstance(data, dict) or data.get("queue") != queue or data.get("vhost", "/") != vhost:
            continue
        for item in data.get("workflows", []):
            name = str(item.get("name", ""))
            if not name:
                continue
            seen = found.get(name)
            schema = item.get("schema")
            if isinstance(schema, dict) and not usable(schema):
                log_event(
                    logger,
                    logging.WARNING,
                    "workflow_schema_invalid",
                    workflow=name,
                    worker=data.get("hostname"),
                )
                schema = None
            found[name] = WorkflowInfo(
                name=name,
                description=str(item.get("description", "")),
                params=tuple(str(p) for p in item.get("params", [])),
                workers=(seen.workers if seen else 0) + 1,
                schema=schema if isinstance(schema, dict) else None,
            )
    return sorted(found.values(), key=lambda w: w.name)


class WorkflowCatalog:
    """What a client may submit, from the workers' adverts: unknown workflows are refused up front.

    When Redis is down, or no worker has advertised yet (Redis restarted and lost the keys; they
    re-advertise within ``ADVERTISE_EVERY``) while workers do read the task queue, the check is
    skipped with a warning and the worker judges the workflow.
    """

    def __init__(
        self, client: redis.Redis, queue: str, *, enabled: bool = True, settings: Settings | None = None
    ) -> None:
        self._client = client
        self._settings = settings
        self._queue = queue
        self._enabled = enabled
        self._known: dict[str, WorkflowInfo] = {}
        self._listed_at = 0.0

    def knows(self, workflow: str) -> bool:
        """Known to be runnable, from a recent list (or not checked at all): ``check`` returns at once."""
        if not self._enabled:
            return True
        return workflow in self._known and time.monotonic() - self._listed_at < ADVERTISE_EXPIRY

    def list(self) -> list[WorkflowInfo]:
        try:
            found = list_workflows(self._client, self._queue, self._settings.vhost if self._settings else "/")
        except redis.RedisError as exc:
            if self._settings is not None:
                raise links.registry_error(exc, self._settings, "cannot list workflows") from exc
            raise RegistryUnavailableError(
                f"cannot list workflows: Redis unreachable ({redact(str(exc))})"
            ) from exc
        self._known = {w.name: w for w in found}
        self._listed_at = time.monotonic()
        return found

    def params_for(self, workflow: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``params`` against the schema last advertised for ``workflow``, filling defaults.

        Call after :meth:`check`. Without a schema (untyped workflow, checks off, or no adverts)
        they go as given, and the worker judges them.
        """
        info = self._known.get(workflow) if self._enabled else None
        return info.check(params) if info is not None else dict(params)

    def check(self, workflow: str, task_queue_consumers: Callable[[], int]) -> None:
        if self.knows(workflow):
            return
        try:
            found = self.list()
        except RegistryUnavailableError as exc:
            log_event(logger, logging.WARNING, "workflow_check_skipped", workflow=workflow, error=exc)
            return
        known = [w.name for w in found]
        if workflow in known:
            return
        if not found and task_queue_consumers() > 0:
            log_event(
                logger, logging.WARNING, "workflow_check_skipped", workflow=workflow, reason="no adverts"
            )
            return
        raise UnknownWorkflowError(workflow, known, self._queue)
