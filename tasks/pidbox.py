"""A worker's remote-control queue that the loss of a RabbitMQ node cannot lock it out of.

Celery 5.7 declares each worker's pidbox queue (``<hostname>.celery.pidbox``: remote control,
such as Flower's ``enable_events``) exclusive. An exclusive queue lives on the node of the
connection that declared it, and when that node is lost it stays locked to the dead connection:
on RabbitMQ 3.10 for the 30-50 ms the other nodes take to clean up, on RabbitMQ 4.3 while the
node stays down (still after two minutes). A worker failing over declares it again: about
25 ms after the loss when Celery's boot order (random per process) puts remote control before
delayed delivery, about 17 s after it otherwise. Locked, the broker answers 405 RESOURCE_LOCKED,
Celery takes that for an unrecoverable error and the worker exits, its jobs left in the queue.

So each declare gets a name of its own: a failover never meets the dead connection's queue.
Remote control still reaches the worker, since it is broadcast on a fanout exchange (the worker
picks what is addressed to its hostname); the old queue goes with its connection (auto-delete).
"""

from __future__ import annotations

import uuid
from typing import Any

from celery.app.control import Control as CeleryControl
from kombu.entity import Queue
from kombu.pidbox import Mailbox as KombuMailbox

#: Celery's own remote control class, as an app names it by default.
CELERY_CONTROL = "celery.app.control:Control"


class Mailbox(KombuMailbox):
    """kombu's mailbox, whose worker queue has a new name for every declare."""

    def get_queue(self, hostname: str) -> Queue:
        queue: Queue = super().get_queue(hostname)  # type: ignore[no-untyped-call]
        queue.name = f"{queue.name}.{uuid.uuid4().hex[:12]}"
        return queue


#: Celery's remote control with that mailbox (a module-level class: an app pickles by name).
Control: Any = type("Control", (CeleryControl,), {"Mailbox": Mailbox, "__module__": __name__})


def install(app: Any) -> None:
    """Give ``app`` this remote control, unless the app brought a control class of its own."""
    if app.control_cls == CELERY_CONTROL:
        app.control_cls = f"{__name__}:Control"
    made = vars(app).get("control")  # already made (a cached property): change its mailbox
    if made is not None and type(made.mailbox) is KombuMailbox:
        made.mailbox.__class__ = Mailbox
