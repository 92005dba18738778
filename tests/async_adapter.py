"""The async client behind JobClient's synchronous face, so one test body runs against both clients.

The adapter runs an event loop in a thread of its own and forwards each call to
``AsyncJobClient``'s coroutine of the same name: what is tested is the async client's public
API, with plain-function callbacks (which it runs in asyncio's default executor).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from ebb import Job, JobRecord, JobResult, Settings, WorkflowInfo
from ebb.aio import AsyncJobClient

T = TypeVar("T")


class AsyncClientAsSync:
    """``AsyncJobClient`` with ``JobClient``'s method names, blocking until each coroutine ends."""

    def __init__(self, broker_url: str | None = None, *, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-client", daemon=True)
        self._thread.start()
        self.client = AsyncJobClient(broker_url, settings=settings)
        self.settings = self.client.settings
        try:
            self._run(self.client.start())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    @property
    def reconnects(self) -> int:
        return self.client.reconnects

    def submit_job(self, workflow: str, params: Any = None, **kwargs: Any) -> Job:
        return self._run(self.client.submit_job(workflow, params, **kwargs))

    def connect_to_submitted_job(self, job: Any, **kwargs: Any) -> Job:
        return self._run(self.client.connect_to_submitted_job(job, **kwargs))

    def disconnect_from_submitted_job(self, job: Any, **kwargs: Any) -> None:
        self._run(self.client.disconnect_from_submitted_job(job, **kwargs))

    def wait(self, job: Any, timeout: float | None = None) -> JobResult:
        return self._run(self.client.wait(job, timeout))

    def cancel_job(self, job: Any) -> None:
        self._run(self.client.cancel_job(job))

    def job_status(self, job: Any) -> JobRecord:
        return self._run(self.client.job_status(job))

    def list_workflows(self) -> list[WorkflowInfo]:
        return self._run(self.client.list_workflows())

    def close(self) -> None:
        try:
            self._run(self.client.close(), timeout=30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        """Shut down as ``asyncio.run`` does: tasks left behind are cancelled and awaited first."""
        with contextlib.suppress(Exception):
            self._run(_cancel_leftover_tasks(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()  # its selector and self-pipe: no descriptor left behind

    def __enter__(self) -> AsyncClientAsSync:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _cancel_leftover_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
