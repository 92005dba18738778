"""A workflow module of your own: start workers with EBB_WORKFLOW_MODULES=examples.my_workflows.

EBB_WORKFLOW_MODULES=examples.my_workflows celery -A tasks worker
"""

import logging
from typing import Any

from tasks.workflows import Progress, workflow

logger = logging.getLogger(__name__)


@workflow("examples.word_count", params=("text",))
def word_count(params: dict[str, Any], progress: Progress) -> dict[str, int]:
    """Count the words of ``text``, one progress report per line."""
    lines = str(params["text"]).splitlines() or [""]
    counts: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        for word in line.split():
            counts[word.lower()] = counts.get(word.lower(), 0) + 1
        progress(number / len(lines), f"line {number}/{len(lines)}")
    logger.info("counted %d distinct words", len(counts))
    return counts
