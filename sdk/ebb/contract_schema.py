"""The published contract: JSON Schemas of every message and of the job queues' arguments.

Generated from :mod:`ebb.contract`'s types, so the documents in ``docs/contract/`` cannot say
something the code does not do (a test regenerates them and compares). Write them with
``python -m ebb.contract_schema docs/contract``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from ebb import contract

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
#: File stem -> the type it describes.
DOCUMENTS: Final[dict[str, Any]] = {
    "task": contract.TaskRequest,
    "status": contract.StatusUpdate,
    "progress": contract.ProgressUpdate,
    "result": contract.JobResult,
    "job-queue-arguments": contract.JobQueueArguments,
}
SUMMARIES: Final = {
    "task": "The one argument of the ebb.run_job Celery task (the caller publishes it).",
    "status": "A message on jobs.<id>.status (the worker publishes it).",
    "progress": "A message on jobs.<id>.progress (the worker publishes it).",
    "result": "The one message on jobs.<id>.result (the worker publishes it).",
    "job-queue-arguments": "The arguments of every jobs.<id>.<kind> queue (the caller declares them).",
}


def schema(stem: str) -> dict[str, Any]:
    """One self-contained schema document, top-level object inlined, shared types under $defs."""
    generated: dict[str, Any] = msgspec.json.schema(DOCUMENTS[stem])
    defs: dict[str, Any] = generated.get("$defs", {})
    top_name = generated["$ref"].rsplit("/", 1)[-1]
    document = {"$schema": DIALECT, "$id": f"{stem}.schema.json", **defs.pop(top_name)}
    document["description"] = SUMMARIES[stem] + " " + document.get("description", "")
    document["description"] = document["description"].strip()
    if defs:
        document["$defs"] = defs
    return document


def render(stem: str) -> str:
    return json.dumps(schema(stem), indent=2, sort_keys=True) + "\n"


def files() -> dict[str, str]:
    """File name -> content, for every published schema."""
    return {f"{stem}.schema.json": render(stem) for stem in DOCUMENTS}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/contract")
    for path in write(target):
        print(path)
