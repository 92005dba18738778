"""Loaded into every test worker (``EBB_WORKFLOW_MODULES``): checks what it sends against the docs.

Each message the worker publishes, and each task request it receives, is validated against the
published JSON Schema in ``docs/contract/`` (not against our own types), and one line per
message goes to ``EBB_TEST_CONTRACT_LOG``: ``ok <type>`` or ``VIOLATION <type>: <why>``. The
test session fails at its end if any line says VIOLATION (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from celery.signals import task_prerun
from jsonschema import Draft202012Validator

from ebb import contract
from ebb.errors import MalformedMessageError
from tasks.publisher import ReplyPublisher

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "contract"
VALIDATORS = {
    stem: Draft202012Validator(
        json.loads((CONTRACT / f"{stem}.schema.json").read_text()),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
    for stem in ("task", "status", "progress", "result")
}


def record(kind: str, document: Any) -> None:
    errors = sorted(VALIDATORS[kind].iter_errors(document), key=lambda e: list(e.absolute_path))
    _write(f"ok {kind}" if not errors else f"VIOLATION {kind}: {errors[0].message} in {document!r:.300}")


def _write(line: str) -> None:
    path = os.environ.get("EBB_TEST_CONTRACT_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


_publish = ReplyPublisher.publish


def _checked_publish(self: ReplyPublisher, queue: str, message: contract.Message, **options: Any) -> bool:
    body = json.loads(contract.encode_message(message))
    record(str(body.get("type")), body)
    return _publish(self, queue, message, **options)


ReplyPublisher.publish = _checked_publish  # type: ignore[method-assign]


def _check_request(sender: Any = None, args: Any = None, **_: Any) -> None:
    """A task request must fit the schema exactly when the worker's own code accepts it.

    Tests send malformed requests on purpose; those must be refused by both, the schema and
    the code (``ok task-refused``): any disagreement is a VIOLATION.
    """
    if getattr(sender, "name", None) != contract.TASK_NAME or not args:
        return
    try:
        contract.TaskRequest.from_celery_arg(args[0])
    except MalformedMessageError as refused:
        if VALIDATORS["task"].is_valid(args[0]):
            _write(f"VIOLATION task: the schema accepts what the code refuses ({refused}): {args[0]!r:.300}")
        else:
            _write("ok task-refused")
        return
    record("task", args[0])


task_prerun.connect(_check_request, weak=False)
