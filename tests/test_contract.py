"""The wire contract refuses anything it does not understand, with a message that says why."""

from __future__ import annotations

import pickle
import uuid
from datetime import timedelta

import pytest

from ebb.config import Settings
from ebb.contract import (
    JobResult,
    JobStatus,
    QueueKind,
    TaskRequest,
    decode,
    encode,
    job_queue,
    parse_queue_name,
    queue_name,
)
from ebb.errors import MalformedMessageError


def test_queue_names_round_trip_and_reject_strangers() -> None:
    job_id = uuid.uuid4()
    for kind in QueueKind:
        assert parse_queue_name(queue_name(job_id, kind)) == (job_id, kind)
    assert parse_queue_name(f"jobs.{job_id}.other") is None
    assert parse_queue_name("celery") is None


def test_job_queue_arguments() -> None:
    queue = job_queue(uuid.uuid4(), QueueKind.RESULT, timedelta(hours=48))
    assert queue.durable and not queue.exclusive and not queue.auto_delete
    arguments = queue.queue_arguments  # type: ignore[attr-defined]
    assert arguments == {"x-expires": 172_800_000, "x-queue-type": "classic"}


def test_pickle_is_refused() -> None:
    body = pickle.dumps({"v": 1})
    with pytest.raises(MalformedMessageError, match="application/json only"):
        decode(QueueKind.RESULT, body, "application/x-python-serialize")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x80\x04not json", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"v": 2, "type": "result"}', "schema version 2"),
        (b'{"v": 1, "type": "progress"}', "expected a result"),
        (b'{"v": 1, "type": "result", "job_id": "x", "status": "SUCCEEDED", "at": 1}', "not a UUID"),
        (
            b'{"v": 1, "type": "result", "job_id": "'
            + str(uuid.uuid4()).encode()
            + b'", "status": "RUNNING", '
            b'"at": 1}',
            "not a final status",
        ),
    ],
)
def test_malformed_results_are_named(body: bytes, match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode(QueueKind.RESULT, body, "application/json")


def test_result_round_trip() -> None:
    result = JobResult(uuid.uuid4(), JobStatus.SUCCEEDED, {"x": [1, 2]}, None, {"progress": 3}, 12.5)
    assert decode(QueueKind.RESULT, encode(result.to_dict()), "application/json") == result


def test_task_request_requires_result_queue() -> None:
    request = TaskRequest(uuid.uuid4(), "demo.echo", {}, frozenset({QueueKind.RESULT}))
    assert TaskRequest.from_dict(request.to_dict()) == request
    broken = {**request.to_dict(), "queues": ["progress"]}
    with pytest.raises(MalformedMessageError, match="result queue"):
        TaskRequest.from_dict(broken)


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"x": float("nan")})


def test_settings_from_env_names_the_bad_variable() -> None:
    with pytest.raises(ValueError, match="EBB_MAX_TTL"):
        Settings.from_env({"EBB_MAX_TTL": "soon"})
    with pytest.raises(ValueError, match="EBB_DEFAULT_TTL"):
        Settings.from_env({"EBB_DEFAULT_TTL": "100", "EBB_MAX_TTL": "10"})
    custom = Settings.from_env({"EBB_BROKER_URL": "amqp://u:p@h:5672/prod", "EBB_DEFAULT_TTL": "60"})
    assert custom.vhost == "prod"
    failover = Settings.from_env({"EBB_BROKER_URL": "amqp://u:p@n2:5672/prod;amqp://u:p@n1:5672/prod"})
    assert failover.vhost == "prod"  # a cluster's failover list: one vhost
    assert custom.default_ttl == timedelta(seconds=60)
