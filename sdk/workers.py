"""Which workflows the running workers can run, as they advertise it in Redis.

Each worker keeps ``ebb:workers:<hostname>`` alive (30 s expiry, refreshed every 10 s) with the
task queue it reads and its workflows, so a caller can list them and refuse at once a workflow
nobody runs, before any queue is declared.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

WORKERS_KEY_PREFIX = "ebb:workers:"
ADVERTISE_EVERY = 10.0
ADVERTISE_EXPIRY = 30


@dataclass(frozen=True)
class WorkflowInfo:
    name: str
    description: str
    params: tuple[str, ...]
    workers: int


def advertisement(hostname: str, queue: str, workflows: list[dict[str, Any]]) -> str:
    return json.dumps({"hostname": hostname, "queue": queue, "workflows": workflows, "at": time.time()})


def list_workflows(client: redis.Redis, queue: str) -> list[WorkflowInfo]:
    """Workflows advertised by live workers reading ``queue``; raises ``redis.RedisError``."""
    keys = list(client.scan_iter(match=f"{WORKERS_KEY_PREFIX}*", count=500))
    if not keys:
        return []
    found: dict[str, WorkflowInfo] = {}
    for raw in client.mget(keys):
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            continue
        if not isinstance(data, dict) or data.get("queue") != queue:
            continue
        for item in data.get("workflows", []):
            name = str(item.get("name", ""))
            if not name:
                continue
            seen = found.get(name)
            found[name] = WorkflowInfo(
                name=name,
                description=str(item.get("description", "")),
                params=tuple(str(p) for p in item.get("params", [])),
                workers=(seen.workers if seen else 0) + 1,
            )
    return sorted(found.values(), key=lambda w: w.name)
