"""Ebb's worker app with per-step toggles for ``bench/bench_toggles.py`` (never for production).

``celery -A bench.toggled_worker worker``: the same app as ``celery -A tasks``, with the steps
named in ``EBB_BENCH_TOGGLES`` (comma separated) switched back or off, so that one bench run
can measure each step on and off against the same code:

- ``transient_result``: the result is transient (breaks "never lost": measured only, to show
  what the guarantee costs)
"""

from __future__ import annotations

import os
from typing import Any

from tasks import app
from tasks.publisher import ReplyPublisher

TOGGLES = {name for name in os.environ.get("EBB_BENCH_TOGGLES", "").split(",") if name}
KNOWN = {"transient_result"}
if TOGGLES - KNOWN:
    raise SystemExit(f"unknown EBB_BENCH_TOGGLES {sorted(TOGGLES - KNOWN)}; known: {sorted(KNOWN)}")

if "transient_result" in TOGGLES:
    _publish = ReplyPublisher.publish

    def _transient(self: ReplyPublisher, queue: str, message: Any, **options: Any) -> bool:
        return _publish(self, queue, message, **{**options, "persistent": False})

    ReplyPublisher.publish = _transient  # type: ignore[method-assign]

__all__ = ["app"]
