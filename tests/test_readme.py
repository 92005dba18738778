"""The README's Python blocks compile, and the typed-workflow and own-app ones run as written."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT

README = (Path(ROOT) / "README.md").read_text()
BLOCKS = re.findall(r"^ *```python\n(.*?)^ *```", README, re.S | re.M)


def _block(containing: str) -> str:
    found = [textwrap.dedent(b) for b in BLOCKS if containing in b]
    assert len(found) == 1, f"expected one README block with {containing!r}, found {len(found)}"
    return found[0]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_every_python_block_compiles() -> None:
    assert len(BLOCKS) >= 5
    for number, block in enumerate(BLOCKS):
        compile(textwrap.dedent(block), f"README.md python block {number}", "exec")


def test_the_typed_workflow_block_registers_an_advertised_schema() -> None:
    code = _block('@workflow("reports.build", params=BuildParams)') + textwrap.dedent(
        """
        from tasks import workflows
        from ebb.params import apply
        advert = next(w for w in workflows.describe() if w["name"] == "reports.build")
        print(sorted(advert["schema"]["properties"]), advert["schema"]["required"])
        print(apply("reports.build", advert["schema"], {"title": "Q3"})["window"])
        print(workflows.get("reports.build").params("reports.build", {"title": "Q3", "pages": 2}).pages)
        """
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "['draft', 'format', 'pages', 'scale', 'since', 'title', 'window'] ['title']",
        "P7D",
        "2",
    ]


def test_the_own_app_block_puts_ebb_on_that_app() -> None:
    code = _block("install(app)") + textwrap.dedent(
        """
        print(sorted(t for t in app.tasks if not t.startswith("celery.")))
        print(sorted(app.conf.beat_schedule), [q.name for q in app.conf.task_queues])
        """
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "['ebb.audit_queues', 'ebb.run_job', 'shop.add']"
    assert lines[1].startswith("['ebb-audit-queues'] ['shop', ")
