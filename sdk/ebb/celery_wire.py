"""Celery's message for an ``ebb.run_job`` task and its ``task-sent`` event, built by Celery's own code.

The caller publishes both itself, on its one connection and with confirms it never blocks on,
so it needs Celery only to format them exactly as the workers' Celery reads them and as Flower
shows them. No worker machinery, backend or configuration module is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any, Final

import amqp
from celery import Celery
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset

from ebb import contract

EVENT_EXCHANGE: Final = "celeryev"
EVENT_ROUTING_KEY: Final = "task.sent"
JSON: Final = "application/json"


class TaskMessages:
    """Formats task messages and their sent events for one caller process."""

    def __init__(self) -> None:
        # loader="app": never the "default" loader, which would import a celeryconfig module.
        self._app = Celery("ebb-caller", set_as_current=False, loader="app")
        self.hostname = anon_nodename()

    def task(self, request: contract.TaskRequest) -> tuple[amqp.Message, dict[str, Any]]:
        """The task message (persistent, ``correlation_id`` = job id) and its sent-event fields.

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
            create_sent_event=True,
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
        return message, {**(built.sent_event or {}), "name": request.workflow}

    def sent_event(self, fields: dict[str, Any], queue: str) -> amqp.Message:
        """The ``task-sent`` event Celery's own ``send_task`` would publish (transient, like Celery's)."""
        event = Event(
            "task-sent",
            hostname=self.hostname,
            utcoffset=utcoffset(),
            pid=os.getpid(),
            clock=self._app.clock.forward(),
            queue=queue,
            exchange="",
            routing_key=queue,
            **fields,
        )
        return amqp.Message(
            json.dumps(event),
            content_type=JSON,
            content_encoding="utf-8",
            application_headers={"hostname": self.hostname},
            delivery_mode=1,
        )
