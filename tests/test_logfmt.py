"""Log lines operators can split back into fields, whatever the values hold."""

from __future__ import annotations

import logging
import shlex

import pytest

from ebb.logfmt import format_event, log_events


def fields_of(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(line, posix=True))


def test_awkward_values_come_back_intact() -> None:
    values = {
        "job_id": "0b5a4a9e-1c1e-4e43-9e0b-9a7d9c0e5f11",
        "error": "RuntimeError('it said \"no\" = bad')",
        "path": "C:\\jobs\\x",
        "detail": "two\\nlines",
        "empty": "",
        "count": 3,
    }
    line = format_event("job_failed", **values, skipped=None)
    assert "\n" not in line
    assert fields_of(line) == {"event": "job_failed", **{k: str(v) for k, v in values.items()}}


def test_a_burst_logs_one_line_per_event_with_the_callers_location(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("ebb.test")
    with caplog.at_level(logging.INFO, "ebb.test"):
        count = log_events(logger, logging.WARNING, "orphan_found", ({"queue": f"q{i}"} for i in range(3)))
    assert count == 3
    assert [r.getMessage() for r in caplog.records] == [f"event=orphan_found queue=q{i}" for i in range(3)]
    assert {(r.filename, r.levelname) for r in caplog.records} == {("test_logfmt.py", "WARNING")}
