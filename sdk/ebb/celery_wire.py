"""Celery's message for an ``ebb.run_job`` task, built by Celery's own code.

The caller publishes it itself, on its one connection and with confirms it never blocks on, so
it needs Celery only to format it exactly as the workers' Celery reads it and as Flower shows
it. No worker machinery, backend or configuration module is loaded.

No ``task-sent`` event goes with it: Flower would list the job as PENDING from it, and for ever
when its worker ran it while nobody watched (workers send task events only then). Flower hears
of a job from its worker, with its real state (``tasks/final_events.py``).
"""

from __future__ import annotations

import json
from typing import Final

import amqp
from celery import Celery
from celery.utils.nodenames import anon_nodename

from ebb import contract

JSON: Final = "application/json"


class TaskMessages:
    """Formats task messages for one caller process."""

    def __init__(self) -> None:
        # loader="app": never the "default" loader, which would import a celeryconfig module.
        self._app = Celery("ebb-caller", set_as_current=False, loader="app")
        self.hostname = anon_nodename()

    def task(self, request: contract.TaskRequest) -> amqp.Message:
        """The task message (persistent, ``correlation_id`` = job id).

        The workflow is the task's *shadow name*, Celery's own "name in logs and monitoring":
        the worker still runs ``ebb.run_job``, but its log lines, its events and so Flower's
        task list name the workflow.
        """
        job_id = str(request.job_id)
        built = self._app.amqp.as_task_v2(
            job_id,
            contract.TASK_NAME,
            args=[request.to_celery_arg()],
            kwargs={},
            create_sent_event=False,
            argsrepr=repr((request.workflow, job_id)),
            kwargsrepr="{}",
            origin=self.hostname,
            ignore_result=True,
            shadow=request.workflow,
        )
        message = amqp.Message(
            json.dumps(built.body, separators=(",", ":")),
            content_type=JSON,
            content_encoding="utf-8",
            application_headers=built.headers,
            delivery_mode=2,
            **built.properties,
        )
        return message
