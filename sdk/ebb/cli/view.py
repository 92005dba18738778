"""What a person (a progress bar) or a script (JSON lines) sees of a job while it runs."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ebb import Job, JobResult, ProgressUpdate, StatusUpdate


class JobView:
    """Callbacks for one job. Rich draws the bar when stdout is a terminal, plain lines otherwise."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self._lock = threading.Lock()
        self._console = Console(stderr=False)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._status = "WAITING"
        self._message = ""
        # The client's callbacks can run before submit_job returns (its I/O thread saw the job
        # start first): their lines wait until the job's own line is out, so that it comes first.
        self._held: list[tuple[str, dict[str, Any]]] | None = []

    def __enter__(self) -> JobView:
        if not self.as_json and self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[status]:<9}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=self._console,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=1.0, status=self._status)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def opened(self, *, text: str | None = None, event: str | None = None, **fields: Any) -> None:
        """Print the job's own line (plain text, an event or none), then what its callbacks said."""
        with self._lock:
            if text is not None:
                self._line(text)
            if event is not None:
                self._print(event, fields)
            held, self._held = self._held or [], None
            for held_event, held_fields in held:
                self._print(held_event, held_fields)

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append((event, fields))
                return
            self._print(event, fields)

    def _line(self, text: str) -> None:
        if self._progress is None:
            click.echo(text)
        else:
            self._progress.console.print(text, highlight=False)

    def _print(self, event: str, fields: dict[str, Any]) -> None:
        if self.as_json:
            click.echo(json.dumps({"event": event, **fields}, default=str))
        else:
            self._line(" ".join([event, *(f"{k}={v}" for k, v in fields.items())]))
        sys.stdout.flush()

    def on_status(self, job: Job, update: StatusUpdate) -> None:
        self._status = update.status.value
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=self._status)
        else:
            self.emit("status", job_id=job.id, status=update.status.value, attempt=update.attempt)

    def on_progress(self, job: Job, update: ProgressUpdate) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=update.progress, description=update.message)
        else:
            self.emit("progress", job_id=job.id, progress=update.progress, message=update.message)

    def on_finished(self, job: Job, result: JobResult) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=result.status.value)
        fields: dict[str, Any] = {"job_id": job.id, "status": result.status.value, "output": result.output}
        if result.error is not None:
            fields["error"] = f"{result.error.type}: {result.error.message}"
        self.emit("result", **fields)
