"""The wire contract refuses anything it does not understand, with a message that says why."""

from __future__ import annotations

import json
import pickle
import uuid
from datetime import timedelta

import pytest

from ebb.config import Settings
from ebb.contract import (
    JobResult,
    JobStatus,
    ProgressUpdate,
    QueueKind,
    TaskRequest,
    decode,
    encode,
    encode_message,
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
        (b'{"v": 1, "type": "result", "job_id": "x", "status": "SUCCEEDED", "at": 1}', "Invalid UUID"),
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


def _progress(**fields: object) -> bytes:
    base = {"v": 1, "type": "progress", "job_id": str(uuid.uuid4()), "progress": 0.5}
    return json.dumps({**base, "message": "half", "seq": 1, "at": 1.5, **fields}).encode()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"progress": 1.5}, r"<= 1.0 - at `\$.progress`"),
        ({"progress": -0.1}, r">= 0.0 - at `\$.progress`"),
        ({"seq": True}, r"Expected `int`, got `bool` - at `\$.seq`"),
        ({"seq": "1"}, r"Expected `int`, got `str` - at `\$.seq`"),
        ({"seq": 0}, r">= 1 - at `\$.seq`"),
        ({"message": None}, r"Expected `str`, got `null` - at `\$.message`"),
        ({"attempt": 0}, r">= 1 - at `\$.attempt`"),
        ({"v": 2, "progress": "anything"}, "schema version 2"),
    ],
)
def test_wrong_types_and_ranges_are_named_with_their_field(fields: dict[str, object], match: str) -> None:
    with pytest.raises(MalformedMessageError, match=match):
        decode(QueueKind.PROGRESS, _progress(**fields), "application/json")


def test_unknown_fields_are_ignored_so_a_newer_worker_may_add_some() -> None:
    update = decode(QueueKind.PROGRESS, _progress(eta=12), None)
    assert isinstance(update, ProgressUpdate) and update.progress == 0.5 and update.attempt == 1


def test_result_round_trip() -> None:
    result = JobResult(
        job_id=uuid.uuid4(),
        status=JobStatus.SUCCEEDED,
        output={"x": [1, 2]},
        last_seq={"progress": 3},
        at=12.5,
    )
    body = encode_message(result)
    assert json.loads(body)["type"] == "result" and json.loads(body)["v"] == 1
    assert decode(QueueKind.RESULT, body, "application/json") == result


def test_task_request_requires_result_queue() -> None:
    request = TaskRequest(uuid.uuid4(), "demo.echo", {}, frozenset({QueueKind.RESULT}), 30.0)
    arg = request.to_celery_arg()
    assert arg["ttl"] == 30.0 and arg["queues"] == ["result"] and arg["type"] == "task"
    assert TaskRequest.from_celery_arg(arg) == request
    assert request.ttl == timedelta(seconds=30)
    with pytest.raises(MalformedMessageError, match="result queue"):
        TaskRequest.from_celery_arg({**arg, "queues": ["progress"]})
    with pytest.raises(MalformedMessageError, match=r"> 0.0 - at `\$.ttl`"):
        TaskRequest.from_celery_arg({**arg, "ttl": 0})
    with pytest.raises(MalformedMessageError, match="schema version 3"):
        TaskRequest.from_celery_arg({**arg, "v": 3})


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
