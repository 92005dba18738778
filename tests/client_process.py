"""A caller that submits one job, prints its JSON and every callback, then waits to be killed.

``client_process.py WORKFLOW PARAMS_JSON TTL CALLBACKS [sync|async]``: with ``async`` the job is
submitted by an ``AsyncJobClient`` under ``asyncio.run`` (coroutine callbacks), else by a
``JobClient``. Either way the job's JSON is the first line, then one line per callback.
CALLBACKS: ``all`` (result, progress, status), ``held`` (the same three, but none returns, so
nothing delivered is ever acknowledged: it all waits again once the caller is killed), or
anything else for ``on_finished`` only.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

from ebb import Job, JobClient
from ebb.aio import AsyncJobClient

_lock = threading.Lock()


def say(line: str) -> None:
    """One whole line per event; the job's JSON always comes first."""
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def run_sync(workflow: str, params: dict[str, Any], ttl: float, callbacks: str) -> None:
    client = JobClient()

    def printer(describe: Any) -> Any:
        def callback(job: Job, payload: Any) -> None:
            if callbacks == "held":
                threading.Event().wait()  # never returns: the delivery is never acknowledged
            say(describe(payload))

        return callback

    extra = {}
    if callbacks in ("all", "held"):
        extra = {
            "on_progress": printer(lambda p: f"progress {p.progress}"),
            "on_status": printer(lambda s: f"status {s.status.value}"),
        }
    _lock.acquire()  # callbacks wait until the job's JSON is out
    job = client.submit_job(
        workflow,
        params,
        on_finished=printer(lambda r: f"finished {r.status.value}"),
        auto_cleanup_after_ttl=ttl,
        **extra,
    )
    sys.stdout.write(job.to_json() + "\n")
    sys.stdout.flush()
    _lock.release()
    while True:
        time.sleep(60)


async def run_async(workflow: str, params: dict[str, Any], ttl: float, callbacks: str) -> None:
    client = AsyncJobClient()
    await client.start()
    json_out = asyncio.Event()  # callbacks may run before submit_job returns: they wait for the JSON

    def printer(describe: Any) -> Any:
        async def callback(job: Job, payload: Any) -> None:
            await json_out.wait()
            if callbacks == "held":
                await asyncio.Event().wait()  # never returns: the delivery is never acknowledged
            say(describe(payload))

        return callback

    extra = {}
    if callbacks in ("all", "held"):
        extra = {
            "on_progress": printer(lambda p: f"progress {p.progress}"),
            "on_status": printer(lambda s: f"status {s.status.value}"),
        }
    job = await client.submit_job(
        workflow,
        params,
        on_finished=printer(lambda r: f"finished {r.status.value}"),
        auto_cleanup_after_ttl=ttl,
        **extra,
    )
    say(job.to_json())
    json_out.set()
    await asyncio.Event().wait()  # until killed


def main() -> None:
    workflow, params, ttl, callbacks = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    kind = sys.argv[5] if len(sys.argv) > 5 else "sync"
    if kind == "async":
        asyncio.run(run_async(workflow, params, ttl, callbacks))
    elif kind == "sync":
        run_sync(workflow, params, ttl, callbacks)
    else:
        raise SystemExit(f"client kind must be sync or async, not {kind!r}")


if __name__ == "__main__":
    main()
