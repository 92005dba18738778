"""docker-compose.yml is valid and wires every setting the code reads (no Docker engine here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

SECRETS = {
    "RABBITMQ_ADMIN_PASSWORD": "admin-secret",
    "EBB_CALLER_PASSWORD": "caller-secret",
    "EBB_WORKER_PASSWORD": "worker-secret",
    "EBB_MONITOR_PASSWORD": "monitor-secret",
    "FLOWER_BASIC_AUTH": "ops:flower-secret",
}
WORKER_SIDE = ("worker", "beat", "flower")
CALLER_VARS = {"EBB_BROKER_URL", "EBB_REDIS_URL", "EBB_TASK_QUEUE"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    assert tool, "Debian's docker-compose package is needed for this test (.ci/run installs it)"
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("EBB_")}
    return subprocess.run(
        [tool, "-f", os.path.join(ROOT, "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        cwd=ROOT,
    )


def variables_the_code_reads() -> set[str]:
    source = Path(ROOT, "sdk", "ebb", "config.py").read_text()
    return set(re.findall(r'"(EBB_[A-Z_]+)"', source))


def test_compose_file_is_valid_and_complete() -> None:
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"rabbitmq", "redis", "worker", "beat", "flower", "demo", "rabbitmq-users"} <= set(services)
    image = services["rabbitmq"]["image"]
    assert re.fullmatch(r"rabbitmq:\d+\.\d+\.\d+-management", image), "pin RabbitMQ, with management"
    assert "healthcheck" in services["rabbitmq"] and "healthcheck" in services["redis"]
    # The documented deployment: management statistics off (docker-compose 1.x prints src:dst:mode).
    conf = os.path.join(ROOT, "deploy", "rabbitmq.conf")
    mounts = [
        v.split(":") if isinstance(v, str) else [v["source"], v["target"]]
        for v in services["rabbitmq"]["volumes"]
    ]
    assert any(m[0] == conf and m[1].startswith("/etc/rabbitmq/conf.d/") for m in mounts), mounts
    assert "management_agent.disable_metrics_collector = true" in Path(conf).read_text()
    advanced = os.path.join(ROOT, "deploy", "rabbitmq-advanced.config")
    assert [advanced, "/etc/rabbitmq/advanced.config"] == next(m[:2] for m in mounts if m[0] == advanced)
    wanted = variables_the_code_reads()
    assert len(wanted) >= 10
    for name in WORKER_SIDE:
        env = services[name]["environment"]
        assert wanted <= set(env), f"{name} lacks {sorted(wanted - set(env))}"
        assert env["EBB_BROKER_URL"].startswith("amqp://ebb-worker:worker-secret@")
    demo = services["demo"]["environment"]
    assert set(demo) >= CALLER_VARS
    assert demo["EBB_BROKER_URL"].startswith("amqp://ebb-caller:caller-secret@"), "callers use their own user"
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ops:flower-secret"
    assert "beat" in services["beat"]["command"]
    setup = services["rabbitmq-users"]
    assert "/deploy/rabbitmq-policy.sh" in " ".join(setup["entrypoint"]), "the expiry safety net is applied"
    assert setup["environment"]["EBB_MAX_TTL"] == services["worker"]["environment"]["EBB_MAX_TTL"]


def test_compose_refuses_to_start_without_secrets() -> None:
    for missing in SECRETS:
        result = compose_config({k: v for k, v in SECRETS.items() if k != missing})
        assert result.returncode != 0, f"compose accepted a missing {missing}"
        assert missing in result.stderr


def test_no_secret_is_committed() -> None:
    text = Path(ROOT, "docker-compose.yml").read_text()
    assert "guest" not in text
    literal = re.search(r"^\s*[A-Z_]*PASS[A-Z_]*:\s*(?!\$)\S", text, re.MULTILINE)
    assert literal is None, f"passwords must come from the environment: {literal}"
