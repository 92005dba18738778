"""Prometheus metrics (EBB_METRICS_PORT) from real workers, beat and audits, and a real Prometheus
evaluating deploy/ebb-alerts.yml against them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ebb import Job, JobClient, JobStatus
from ebb.config import Settings
from ebb.errors import ConfigurationError
from tasks import metrics_server
from tests.conftest import throwaway_vhost
from tests.support import ROOT, ClientProcess, broker_url_as, free_port, start_worker, stop_worker, wait_until

ALERTS = Path(ROOT, "deploy", "ebb-alerts.yml")
SCRAPE_CONFIG = Path(ROOT, "deploy", "prometheus.yml")
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample a process serves, as Prometheus would read it."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scraped(port: int) -> Samples:
    try:
        return scrape(port)
    except requests.RequestException:
        return {}


def pool_processes(worker: subprocess.Popen[bytes]) -> list[int]:
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    return [int(pid) for pid in children]


# -- settings and the port ------------------------------------------------------------------------


def test_metrics_port_is_off_by_default_and_checked() -> None:
    assert Settings.from_env({}).metrics_port is None
    assert Settings.from_env({"EBB_METRICS_PORT": " "}).metrics_port is None
    assert Settings.from_env({"EBB_METRICS_PORT": "9540"}).metrics_port == 9540
    for bad in ("abc", "0", "70000", "95.4"):
        with pytest.raises(ConfigurationError, match="EBB_METRICS_PORT"):
            Settings.from_env({"EBB_METRICS_PORT": bad})


def test_a_port_in_use_is_logged_and_serves_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, "ebb.metrics"):
            assert not metrics_server.serve(Settings(metrics_port=port), "worker")
    assert f"event=metrics_port_in_use port={port}" in caplog.text
    assert metrics_server.MULTIPROC_ENV not in os.environ


def test_alert_rules_and_scrape_config_pass_promtool() -> None:
    rules = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run([PROMTOOL, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


# -- workers ----------------------------------------------------------------------------------------


def test_worker_metrics_count_jobs_by_workflow_and_outcome(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    queue = f"{settings.task_queue}.metrics.{uuid.uuid4().hex[:6]}"
    env = {"EBB_TASK_QUEUE": queue, "EBB_METRICS_PORT": str(port)}
    worker = start_worker(tmp_path / "worker.log", "-c", "2", env=env)
    try:
        with JobClient(settings=dataclasses.replace(settings, task_queue=queue)) as client:
            assert value(scrape(port), "ebb_jobs_started_total", workflow="demo.echo") == 0  # there at 0
            statuses: dict[uuid.UUID, list[tuple[int, JobStatus]]] = {}

            def record(job: Job, update: Any) -> None:
                statuses.setdefault(job.id, []).append((update.attempt, update.status))

            echo = client.submit_job("demo.echo", {"a": 1})
            fail = client.submit_job("demo.fail", {})
            timeout = client.submit_job("demo.stubborn", {"seconds": 30}, job_timeout=1)
            cancel = client.submit_job("demo.sleep", {"seconds": 30, "steps": 30}, on_status=record)
            assert wait_until(lambda: (1, JobStatus.RUNNING) in statuses.get(cancel.id, []), 20)
            client.cancel_job(cancel)
            outcomes = {client.wait(job, timeout=30).status for job in (echo, fail, timeout, cancel)}
            assert outcomes == {JobStatus.SUCCEEDED, JobStatus.ERROR, JobStatus.TIMEOUT, JobStatus.CANCELLED}

            lost = client.submit_job("demo.sleep", {"seconds": 2, "steps": 2}, on_status=record)
            assert wait_until(lambda: (1, JobStatus.RUNNING) in statuses.get(lost.id, []), 20)
            assert value(scrape(port), "ebb_jobs_running", workflow="demo.sleep") == 1
            for pid in pool_processes(worker):  # both pool processes: one runs the job
                os.kill(pid, signal.SIGKILL)
            result = client.wait(lost, timeout=30)
            assert result.status is JobStatus.SUCCEEDED and result.attempt == 2
        samples = scrape(port)
    finally:
        stop_worker(worker)
        with JobClient(settings=settings) as cleanup:
            for name in (queue, f"{queue}.audit"):
                cleanup._loop.call(functools.partial(cleanup._publish_channel.queue_delete, name))

    def finished(workflow: str, status: str) -> float:
        return value(samples, "ebb_jobs_finished_total", workflow=workflow, status=status)

    assert finished("demo.echo", "SUCCEEDED") == 1
    assert finished("demo.fail", "ERROR") == 1
    assert finished("demo.stubborn", "TIMEOUT") == 1
    assert finished("demo.sleep", "CANCELLED") == 1
    assert finished("demo.sleep", "SUCCEEDED") == 1  # the run after the pool process died
    assert sum(v for (name, _), v in samples.items() if name == "ebb_jobs_finished_total") == 5
    # demo.sleep: the cancelled job, and the other job's two runs (the first killed).
    assert value(samples, "ebb_jobs_started_total", workflow="demo.sleep") == 3
    assert value(samples, "ebb_job_attempts_after_worker_lost_total", workflow="demo.sleep") == 1
    assert value(samples, "ebb_job_attempts_after_worker_lost_total", workflow="demo.echo") == 0
    # The killed process's running job is dropped when it is found dead: nothing runs now.
    assert value(samples, "ebb_jobs_running", workflow="demo.sleep") == 0
    assert value(samples, "ebb_job_duration_seconds_count", workflow="demo.sleep") == 2
    assert value(samples, "ebb_job_duration_seconds_bucket", workflow="demo.stubborn", le="1.0") == 0
    assert value(samples, "ebb_job_duration_seconds_bucket", workflow="demo.stubborn", le="5.0") == 1
    assert value(samples, "ebb_job_duration_seconds_sum", workflow="demo.stubborn") >= 1
    assert value(samples, "ebb_results_not_delivered_total", workflow="demo.echo", reason="expired") == 0


# -- the audit and beat, through a real Prometheus ---------------------------------------------------


@dataclass
class Scene:
    """A worker and a beat of their own in a vhost of their own (no other test's queues, no expiry
    policy), scraped by a real Prometheus, before and after a killed caller's queues expired."""

    worker_port: int
    beat_port: int
    prometheus: str
    before: Samples
    after: Samples
    #: The largest count of each ``ebb_job_queues`` state seen while the orphan waited.
    states_seen: dict[str, float]
    #: The orphan alert's expression, evaluated by Prometheus before the caller was killed.
    orphan_expr_before: list[Any]


def query(prometheus: str, expr: str) -> list[Any]:
    response = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    response.raise_for_status()
    result: list[Any] = response.json()["data"]["result"]
    return result


def rule(name: str) -> dict[str, Any]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    found: dict[str, Any] = next(r for g in groups for r in g["rules"] if r.get("alert") == name)
    return found


def prometheus_config(worker_port: int, beat_port: int) -> dict[str, Any]:
    """deploy/prometheus.yml with the test's targets, a 1 s rhythm and the real rule file."""
    config: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    ports = {"worker": worker_port, "beat": beat_port}
    job = config["scrape_configs"][0]
    job["static_configs"] = [
        {"targets": [f"127.0.0.1:{ports[group['labels']['role']]}"], "labels": group["labels"]}
        for group in job["static_configs"]
    ]
    return config


@pytest.fixture(scope="module")
def vhost(settings: Settings) -> Iterator[str]:
    with throwaway_vhost(settings, "ebb-metrics") as name:
        yield name
    memory = redis.Redis.from_url(settings.redis_url, socket_timeout=3)
    stale = list(memory.scan_iter(match=f"ebb:audit:{name}:*"))
    if stale:
        memory.delete(*stale)


def _start_beat(tmp: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "celery", "-A", "tasks", "beat", "-l", "INFO"),
            *("-s", str(tmp / "schedule"), "--logfile", str(tmp / "beat.log")),
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        start_new_session=True,
    )


def _start_prometheus(tmp: Path, worker_port: int, beat_port: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(worker_port, beat_port)))
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            *(PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}"),
            *(f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    assert wait_until(ready, 30), (tmp / "prometheus.log").read_text()
    return proc, url


@pytest.fixture(scope="module")
def scene(settings: Settings, vhost: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    tmp = tmp_path_factory.mktemp("metrics-scene")
    worker_port, beat_port = free_port(), free_port()
    private = {
        "EBB_BROKER_URL": broker_url_as(settings, vhost=vhost),
        "EBB_TASK_QUEUE": f"{settings.task_queue}.metrics",
        "EBB_AUDIT_INTERVAL": "1",
    }
    worker = start_worker(
        tmp / "worker.log", "-c", "2", env={**private, "EBB_METRICS_PORT": str(worker_port)}
    )
    beat = _start_beat(tmp, {**private, "EBB_METRICS_PORT": str(beat_port)})
    prometheus, url = _start_prometheus(tmp, worker_port, beat_port)
    try:
        # Prometheus has seen the counters at 0 and an audit's gauges: an increase will show.
        assert wait_until(
            lambda: (
                bool(query(url, "ebb_audit_orphans_found_total == 0"))
                and bool(query(url, 'ebb:job_queues:latest{state="in_use"}'))
                and bool(query(url, "ebb_audits_sent_total > 0"))
            ),
            30,
        ), (tmp / "beat.log").read_text()
        orphan_expr_before = query(url, rule("EbbOrphansFound")["expr"])
        before = scrape(worker_port)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("EBB_BROKER_URL", private["EBB_BROKER_URL"])
            patch.setenv("EBB_TASK_QUEUE", private["EBB_TASK_QUEUE"])
            caller = ClientProcess("demo.sleep", {"seconds": 0.5, "steps": 1}, ttl=4)
        assert caller.read_event() == "status RUNNING"
        caller.kill()  # its three queues wait, unconsumed, until their 4 s TTL runs out
        states_seen: dict[str, float] = {}

        def removed() -> bool:
            now = scraped(worker_port)
            for (name, labels), count in now.items():
                if name == "ebb_job_queues":
                    state = dict(labels)["state"]
                    states_seen[state] = max(states_seen.get(state, 0.0), count)
            return value(now, "ebb_audit_orphans_removed_total") >= 3

        assert wait_until(removed, 30, interval=0.1), (tmp / "worker.log").read_text()[-3000:]
        assert wait_until(lambda: value(scraped(worker_port), "ebb_job_queues", state="unused") == 0, 10)
        yield Scene(
            worker_port,
            beat_port,
            url,
            before,
            scrape(worker_port) | scrape(beat_port),
            states_seen,
            orphan_expr_before,
        )
    finally:
        for proc in (prometheus, beat):
            proc.terminate()
            proc.wait(20)
        stop_worker(worker)


def test_the_audit_metrics_move_as_an_orphan_is_found_and_removed(scene: Scene) -> None:
    before, after = scene.before, scene.after

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("ebb_audit_orphans_found_total") == 3  # result, progress and status: each once
    assert grew("ebb_audit_orphans_removed_total") == 3
    assert grew("ebb_results_lost_total") == 1  # its result was never delivered
    assert grew("ebb_audit_runs_total", outcome="ok") >= 2
    assert value(after, "ebb_audit_runs_total", outcome="failed") == 0
    # While the caller was gone its queues were unused; once removed, nothing is left.
    assert scene.states_seen.get("unused") == 3, scene.states_seen
    assert value(after, "ebb_job_queues", state="unused") == 0
    assert value(after, "ebb_job_queues", state="orphaned") == 0
    assert value(after, "ebb_expiry_policy_missing") == 1  # this vhost has no safety net
    assert time.time() - value(after, "ebb_audit_last_success_timestamp_seconds") < 10
    assert 0 < value(after, "ebb_audit_last_duration_seconds") < 10
    # Beat's own: what it sent, served from its own port.
    assert value(after, "ebb_audits_sent_total") >= 2
    assert time.time() - value(after, "ebb_audit_last_sent_timestamp_seconds") < 10


def test_prometheus_fires_the_orphan_alert_from_the_deployed_rules(scene: Scene) -> None:
    assert scene.orphan_expr_before == []  # false until the caller vanished
    orphans = rule("EbbOrphansFound")["expr"]
    assert wait_until(lambda: bool(query(scene.prometheus, orphans)), 15)

    def firing() -> set[str]:
        alerts = requests.get(f"{scene.prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    wanted = {"EbbOrphansFound", "EbbResultsLost", "EbbExpiryPolicyMissing"}
    assert wait_until(lambda: wanted <= firing(), 15), firing()
    assert not firing() & {"EbbAuditFailing", "EbbAuditNotCompleting", "EbbQueuesWithoutExpiry"}
    # The worker's own metrics, as Prometheus scraped them: the vanished caller's job ran to its end.
    finished = 'ebb_jobs_finished_total{workflow="demo.sleep",status="SUCCEEDED",role="worker"} == 1'
    assert wait_until(lambda: bool(query(scene.prometheus, finished)), 15)
    assert query(scene.prometheus, 'ebb_jobs_started_total{workflow="demo.sleep"} == 1')
    groups = requests.get(f"{scene.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not unhealthy, unhealthy
