"""A result the broker cannot take is never lost in silence: it ends the job ERROR, saying why.

RabbitMQ 4 takes messages up to 16 MiB by default (3.10: 128 MiB), and a larger one is a 406
that closes the publishing channel. Real worker processes, a real broker; the second test lowers
the broker's own ``max_message_size`` for new channels while it runs.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebb import JobClient, JobStatus
from ebb.config import Settings
from tests.support import rabbitmqctl, start_worker, stop_worker


@pytest.fixture
def own_worker(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Settings, Path]]:
    """A worker of its own task queue, with the environment the test asks for (``request.param``)."""
    queue = f"{settings.task_queue}.limits.{uuid.uuid4().hex[:6]}"
    mine = dataclasses.replace(settings, task_queue=queue)
    log = tmp_path / "worker.log"
    proc = start_worker(log, env={"EBB_TASK_QUEUE": queue, **request.param})
    yield mine, log
    stop_worker(proc)
    with JobClient(settings=mine) as client:
        client._loop.call(lambda: client._publish_channel.queue_delete(queue))


@pytest.mark.parametrize("own_worker", [{"EBB_MAX_RESULT_BYTES": "4096"}], indirect=True)
def test_a_result_over_ebb_max_result_bytes_ends_the_job_error_with_its_size_and_the_limit(
    own_worker: tuple[Settings, Path],
) -> None:
    settings, _ = own_worker
    with JobClient(settings=settings) as client:
        big = client.submit_job("demo.echo", {"blob": "x" * 10_000}, on_status=lambda j, s: None)
        result = client.wait(big, timeout=30)
        assert result.status is JobStatus.ERROR
        assert result.error is not None and result.error.type == "ResultTooLarge"
        size = int(re.search(r"result is (\d+) bytes", result.error.message)[1])  # type: ignore[index]
        assert size > 10_000 and "limit of 4096 bytes (EBB_MAX_RESULT_BYTES" in result.error.message
        record = client.job_status(big)
        assert record.status == "ERROR" and record.finished_at is not None and record.lost is None
        # A small output on the same worker is unaffected.
        small = client.wait(client.submit_job("demo.echo", {"blob": "x" * 100}), timeout=30)
        assert small.status is JobStatus.SUCCEEDED and small.output == {"blob": "x" * 100}


#: A broker limit at most this large is exceeded as it is (RabbitMQ 4: 16 MiB by default).
CHEAP_TO_EXCEED = 16 * 1024 * 1024


@pytest.fixture
def broker_limit() -> Iterator[int]:
    """The broker's max_message_size, small enough to exceed with one result.

    RabbitMQ 4's default (16 MiB) is used as it is. 3.x's (128 MiB) is lowered to 64 KiB for the
    channels opened from now on (3.x reads it when a channel opens; 4.x only at boot), then
    restored.
    """
    original = rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").stdout.strip()
    match = re.fullmatch(r"\{ok,(\d+)\}", original.replace(" ", ""))
    current = int(match[1]) if match else 128 * 1024 * 1024
    if current <= CHEAP_TO_EXCEED:
        yield current
        return
    limit = 64 * 1024
    rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {limit}).")
    try:
        yield limit
    finally:
        if match:
            rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {match[1]}).")
        else:
            rabbitmqctl("eval", "application:unset_env(rabbit, max_message_size).")


@pytest.mark.parametrize("own_worker", [{"EBB_MAX_RESULT_BYTES": str(256 * 1024 * 1024)}], indirect=True)
def test_a_result_the_broker_refuses_becomes_an_error_result_never_silence(
    broker_limit: int, own_worker: tuple[Settings, Path]
) -> None:
    """EBB_MAX_RESULT_BYTES set above the broker's limit (a misconfiguration): the 406 itself
    becomes the ERROR."""
    settings, log = own_worker
    with JobClient(settings=settings) as client:
        big = client.submit_job("demo.blob", {"bytes": broker_limit + 1024})
        result = client.wait(big, timeout=60)
        assert result.status is JobStatus.ERROR
        assert result.error is not None and result.error.type == "ResultRefused"
        assert "406" in result.error.message and str(broker_limit) in result.error.message
        assert client.job_status(big).status == "ERROR"  # never SUCCEEDED for what nobody got
        # The worker's next publish is on a fresh channel: its next job succeeds.
        after = client.wait(client.submit_job("demo.echo", {"n": 1}), timeout=30)
        assert after.status is JobStatus.SUCCEEDED
    assert "event=result_refused" in log.read_text()
