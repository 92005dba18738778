"""A workflow module of your own: start workers with EBB_WORKFLOW_MODULES=examples.my_workflows.

EBB_WORKFLOW_MODULES=examples.my_workflows celery -A tasks worker
"""

import logging
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.workflows import Progress, workflow

logger = logging.getLogger(__name__)


@workflow("examples.word_count", params=("text",))
def word_count(params: dict[str, Any], progress: Progress) -> dict[str, int]:
    """Count the words of ``text``, one progress report per line (untyped: a plain dict)."""
    lines = str(params["text"]).splitlines() or [""]
    counts: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        for word in line.split():
            counts[word.lower()] = counts.get(word.lower(), 0) + 1
        progress(number / len(lines), f"line {number}/{len(lines)}")
    logger.info("counted %d distinct words", len(counts))
    return counts


class BuildParams(BaseModel):
    """Typed params: callers see this as JSON Schema, and are checked against it at submit."""

    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not ignored

    title: str = Field(description="Printed on the first page")
    format: Literal["pdf", "csv"] = Field("pdf", description="Output format")
    pages: int = Field(10, ge=1, le=500, description="How many pages")
    scale: float = Field(1.0, gt=0, le=4, description="Zoom factor")
    draft: bool = Field(False, description="Watermark every page")
    since: datetime | None = Field(None, description="Only data after this instant (ISO 8601)")
    window: timedelta = Field(timedelta(days=7), description="How far back from since (ISO 8601)")


class BuildOutput(BaseModel):
    file: str
    pages: int
    covers_seconds: float


@workflow("reports.build", params=BuildParams)
def build_report(params: BuildParams, progress: Progress) -> BuildOutput:
    """Build a report: receives a validated BuildParams, returns a model (sent as JSON)."""
    for page in range(1, params.pages + 1):
        progress(page / params.pages, f"page {page}/{params.pages}")
    suffix = "-draft" if params.draft else ""
    return BuildOutput(
        file=f"{params.title.lower().replace(' ', '-')}{suffix}.{params.format}",
        pages=params.pages,
        covers_seconds=params.window.total_seconds(),
    )
