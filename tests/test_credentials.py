"""No password in anything Ebb prints, whatever the URL form; a refused login says so.

Every run here fails on purpose (wrong password, dead node, refused Redis login, management API
refusal), prints all it can (DEBUG logs, full tracebacks with their chained causes, the ``ebb``
command's output) and the test hunts that output for a marker password.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from ebb.config import Settings
from tests.support import ROOT, broker_url_as, redis_endpoint, wait_until

MARKER = "Mk7-s3cret"
#: A password a careless masker would cut short: URL-special characters, percent-encoded.
AWKWARD = f"{MARKER}:@/;%x"
EBB = str(Path(sys.executable).with_name("ebb"))

FAILING_RUN = """
import asyncio, logging, sys, traceback
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)
from ebb import JobClient, EbbError
from ebb.aio import AsyncJobClient

try:
    JobClient()
except EbbError as exc:
    print("sync:", type(exc).__name__, exc)
    traceback.print_exc(file=sys.stdout)

async def main():
    async with AsyncJobClient():
        pass

try:
    asyncio.run(main())
except EbbError as exc:
    print("async:", type(exc).__name__, exc)
    traceback.print_exc(file=sys.stdout)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env={**os.environ, "EBB_BROKER_TIMEOUT": "5", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _printed(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of its own that wants a password: its URL with a wrong one (the marker)."""
    port = _free_port()
    directory = tmp_path_factory.mktemp("locked-redis")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--requirepass",
            "the-right-one",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        up = wait_until(lambda: _port_open(port), 15, 0.1)
        if not up:
            pytest.fail(f"redis-server --requirepass did not listen on {port}")
        yield f"redis://default:{quote(AWKWARD, safe='')}@127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_a_refused_broker_login_says_the_credentials_were_refused_and_prints_no_password(
    settings: Settings,
) -> None:
    wrong = broker_url_as(settings, password=AWKWARD)
    result = _run([sys.executable, "-c", FAILING_RUN], {"EBB_BROKER_URL": wrong})
    printed = _printed(result)
    for kind in ("sync", "async"):
        assert f"{kind}: BrokerCredentialsRefusedError" in printed, printed[-3000:]
    assert "refused the credentials of user 'guest'" in printed
    assert "check the user name and password in EBB_BROKER_URL" in printed
    assert MARKER not in printed and quote(AWKWARD, safe="") not in printed


def test_no_password_of_a_failover_list_reaches_errors_or_logs(settings: Settings) -> None:
    """Two dead nodes, each with its own password: both masked in errors, logs and tracebacks."""
    dead = [_free_port(), _free_port()]
    urls = ";".join(
        broker_url_as(settings, password=f"{MARKER}-{n}", host="127.0.0.1", port=port)
        for n, port in enumerate(dead)
    )
    result = _run([sys.executable, "-c", FAILING_RUN], {"EBB_BROKER_URL": urls})
    printed = _printed(result)
    assert "sync: BrokerUnavailableError" in printed and "async: BrokerUnavailableError" in printed
    assert printed.count(":***@") >= 2, printed[-3000:]
    assert MARKER not in printed


def test_no_ebb_command_prints_a_password(settings: Settings, locked_redis: str) -> None:
    dead = _free_port()
    broker = ";".join(
        [
            broker_url_as(settings, password=f"{MARKER}-a", host="127.0.0.1", port=dead),
            broker_url_as(settings, password=AWKWARD),
        ]
    )
    env = {"EBB_BROKER_URL": broker, "EBB_REDIS_URL": locked_redis, "EBB_MANAGEMENT_PASSWORD": MARKER}
    runs = {
        "submit": [EBB, "submit", "demo.echo", "-p", "x=1", "--detach"],
        "status": [EBB, "status", "00000000-0000-4000-8000-000000000000"],
        "workflows": [EBB, "workflows"],
        "workflows --json": [EBB, "workflows", "--json"],
        "audit": [EBB, "audit"],
    }
    for name, args in runs.items():
        result = _run(args, env)
        printed = _printed(result)
        assert result.returncode == 4, f"ebb {name}: exit {result.returncode}\n{printed[-2000:]}"
        assert MARKER not in printed and quote(AWKWARD, safe="") not in printed, f"ebb {name}:\n{printed}"
    refused = _printed(_run([EBB, "workflows"], env))
    assert "refused the credentials of EBB_REDIS_URL" in refused, refused


def test_a_refused_redis_login_is_a_registry_credentials_error(settings: Settings, locked_redis: str) -> None:
    import dataclasses

    from ebb import RegistryCredentialsRefusedError
    from ebb.registry import Registry

    locked = dataclasses.replace(settings, redis_url=locked_redis)
    started = time.monotonic()
    with pytest.raises(RegistryCredentialsRefusedError) as caught:
        Registry(locked).get(__import__("uuid").uuid4())
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "refused the credentials of EBB_REDIS_URL" in message
    assert MARKER not in message and host_of(locked_redis) in message


def host_of(url: str) -> str:
    host, port = redis_endpoint(Settings(redis_url=url))
    return f"{host}:{port}"
