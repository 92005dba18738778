"""The Celery application every worker, beat and Flower process loads."""

from __future__ import annotations

from celery import Celery

app = Celery("ebb")
app.config_from_object("celeryconfig")
app.conf.imports = ("tasks.job",)
