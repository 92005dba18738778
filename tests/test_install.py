"""Installs as users make them, against the real servers.

A caller installs only the library (``pip install './sdk[cli]'``) into a venv of their own: no
worker code comes with it, yet jobs and the caller commands work. A user's project that has its
own ``tasks.py`` and ``celeryconfig.py`` (names every Celery tutorial uses) first on PYTHONPATH
must not change what Ebb's ``ebb`` commands and workers load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from ebb.config import Settings
from tests.support import ROOT, broker_url_as, start_worker, stop_worker, wait_until

#: The dev venv's ``ebb`` (pip install -e './sdk[cli]' -e '.[dev]'): caller and operator commands.
DEV_EBB = str(Path(sys.executable).with_name("ebb"))
CALLER_COMMANDS = {"submit", "watch", "status", "cancel", "workflows"}
WORKER_SIDE = ("tasks", "celeryconfig", "sdk", "flower", "tornado")


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run(
    args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def environment(**overrides: str) -> dict[str, str]:
    """This session's environment (EBB_TASK_QUEUE and all), without a PYTHONPATH of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **overrides}


def listed_commands(help_text: str) -> set[str]:
    """The command names of a click group's ``--help``."""
    section = help_text.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    return {line.split()[0] for line in section.splitlines() if not line.startswith("   ")}


# -- a caller's own venv, with only the library --------------------------------------------------


class CallerVenv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = str(root / "venv" / "bin" / "python")
        self.ebb = str(root / "venv" / "bin" / "ebb")
        self.work = root / "work"  # the caller's cwd: nothing of Ebb's repository is on sys.path


@pytest.fixture(scope="module")
def caller_venv(tmp_path_factory: pytest.TempPathFactory) -> CallerVenv:
    venv = CallerVenv(tmp_path_factory.mktemp("caller"))
    venv.work.mkdir()
    # The library's source tree as the caller gets it (a copy, so the build writes nothing into the
    # repository others work in, and no stale egg-info or build/ of the dev install goes along).
    source = venv.root / "src" / "ebb-library"
    shutil.copytree(
        Path(ROOT) / "sdk", source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    env = environment()
    made = run([sys.executable, "-m", "venv", str(venv.root / "venv")], cwd=venv.work, env=env, timeout=120)
    assert made.returncode == 0, made.stderr
    pip = [venv.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    installed = run([*pip, f"{source}[cli]"], cwd=venv.work, env=env, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def test_caller_install_has_no_worker_side(caller_venv: CallerVenv) -> None:
    probe = (
        "import importlib.util, json, ebb\n"
        f"names = {WORKER_SIDE!r}\n"
        "print(json.dumps({'ebb': ebb.__file__,\n"
        "                  'found': [n for n in names if importlib.util.find_spec(n) is not None]}))\n"
    )
    out = run([caller_venv.python, "-c", probe], cwd=caller_venv.work, env=environment())
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["found"] == [], f"a caller-only install can import {seen['found']}"
    assert Path(seen["ebb"]).is_relative_to(caller_venv.root / "venv"), seen["ebb"]


def test_caller_install_runs_a_job(caller_venv: CallerVenv, worker: Path) -> None:
    script = caller_venv.work / "submit_echo.py"
    script.write_text(
        "import json\n"
        "from ebb import JobClient\n"
        "with JobClient() as client:\n"
        "    job = client.submit_job('demo.echo', {'from': 'caller venv', 'n': 1})\n"
        "    result = client.wait(job, timeout=60)\n"
        "print(json.dumps({'job_id': str(job.id), 'status': result.status.value, 'output': result.output}))\n"
    )
    out = run([caller_venv.python, str(script)], cwd=caller_venv.work, env=environment(), timeout=90)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED"
    assert result["output"] == {"from": "caller venv", "n": 1}
    assert result["job_id"] in worker.read_text()  # the session's worker ran it


def test_caller_install_has_the_caller_commands_only(caller_venv: CallerVenv, worker: Path) -> None:
    helped = run([caller_venv.ebb, "--help"], cwd=caller_venv.work, env=environment())
    assert helped.returncode == 0, helped.stderr
    assert listed_commands(helped.stdout) == CALLER_COMMANDS, helped.stdout
    listed = run([caller_venv.ebb, "workflows", "--json"], cwd=caller_venv.work, env=environment())
    assert listed.returncode == 0, listed.stderr
    assert {"demo.sleep", "demo.fail", "demo.echo"} <= {w["name"] for w in json.loads(listed.stdout)}


# -- a user's project whose tasks.py and celeryconfig.py shadow Ebb's ----------------------------


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    project = tmp_path / "userproj"
    project.mkdir()
    (project / "tasks.py").write_text('raise RuntimeError("user tasks.py imported")\n')
    (project / "celeryconfig.py").write_text('raise RuntimeError("user celeryconfig.py imported")\n')
    return project


def shadowed(project: Path, **overrides: str) -> dict[str, str]:
    """The user's project first on PYTHONPATH, as their own shell would have it."""
    return environment(
        PYTHONPATH=os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")])), **overrides
    )


def test_users_modules_do_not_shadow_ebbs_commands(
    worker: Path, user_project: Path, private_vhost: str, settings: Settings
) -> None:
    env = shadowed(user_project)
    listed = run([DEV_EBB, "workflows", "--json"], cwd=user_project, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "demo.echo" in {w["name"] for w in json.loads(listed.stdout)}

    submitted = run([DEV_EBB, "submit", "demo.echo", "-p", "x=1", "--json"], cwd=user_project, env=env)
    assert submitted.returncode == 0, submitted.stderr
    events = json_lines(submitted.stdout)
    assert events[-1]["event"] == "result", events
    assert events[-1]["status"] == "SUCCEEDED" and events[-1]["output"] == {"x": 1}
    job_id = events[0]["job_id"]

    status = run([DEV_EBB, "status", job_id], cwd=user_project, env=env)
    assert status.returncode == 0, status.stderr
    assert job_id in status.stdout and "SUCCEEDED" in status.stdout, status.stdout

    # An operator command: it must load Ebb's own tasks package, never the user's tasks.py.
    broker_url = broker_url_as(settings, vhost=private_vhost)
    audited = run(
        [DEV_EBB, "audit", "--json"], cwd=user_project, env=shadowed(user_project, EBB_BROKER_URL=broker_url)
    )
    assert audited.returncode == 0, audited.stderr
    report = json.loads(audited.stdout)
    assert report["queues"] == [] and report["registry_available"] is True, report  # an empty vhost
    assert report["counts"]["orphaned"] == 0 and report["removed"] == [], report
    assert "user tasks.py imported" not in audited.stderr


def test_worker_started_as_the_readme_says_ignores_the_users_modules(
    settings: Settings, user_project: Path, tmp_path: Path
) -> None:
    queue = f"ebb.test.shadow.{uuid.uuid4().hex[:12]}"
    env = shadowed(user_project, EBB_TASK_QUEUE=queue)
    log = tmp_path / "shadow-worker.log"
    proc = start_worker(log, env=env)  # python -m celery -A tasks worker, cwd = Ebb's repository
    try:
        assert wait_until(
            lambda: '"demo.echo"' in run([DEV_EBB, "workflows", "--json"], cwd=user_project, env=env).stdout,
            20,
            interval=0.5,
        ), "the worker never advertised its workflows on its own queue"
        submitted = run(
            [DEV_EBB, "submit", "demo.echo", "-p", "shadow=true", "--json"], cwd=user_project, env=env
        )
        assert submitted.returncode == 0, submitted.stderr
        events = json_lines(submitted.stdout)
        assert events[-1]["status"] == "SUCCEEDED" and events[-1]["output"] == {"shadow": True}
        assert events[0]["job_id"] in log.read_text()
        assert "user tasks.py imported" not in log.read_text()
        assert "user celeryconfig.py imported" not in log.read_text()
    finally:
        stop_worker(proc)
        deleted = requests.delete(
            f"{settings.management_url}/api/queues/{quote(settings.vhost, safe='')}/{quote(queue, safe='')}",
            auth=(settings.management_user, settings.management_password),
            timeout=10,
        )
        assert deleted.status_code in (204, 404), deleted.text
