"""docs/contract/ is what the code does: regenerated here, and every worker message checked against it."""

from __future__ import annotations

import json
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from kombu.connection import Connection

from ebb import JobClient, JobStatus, contract
from ebb.celery_wire import TaskMessages
from ebb.config import Settings
from ebb.contract_schema import files
from ebb.errors import MalformedMessageError
from tests import contract_probe
from tests.support import ROOT, wait_until

CONTRACT = Path(ROOT) / "docs" / "contract"


def _schema(stem: str) -> Draft202012Validator:
    return Draft202012Validator(
        json.loads((CONTRACT / f"{stem}.schema.json").read_text()),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


def test_the_published_schemas_are_regenerated_unchanged() -> None:
    generated = files()
    published = {path.name: path.read_text() for path in CONTRACT.glob("*.schema.json")}
    assert sorted(published) == sorted(generated), "regenerate: python -m ebb.contract_schema docs/contract"
    for name, text in generated.items():
        assert published[name] == text, f"{name} is stale: python -m ebb.contract_schema docs/contract"
        Draft202012Validator.check_schema(json.loads(text))
    assert (CONTRACT / "README.md").exists()


def _progress(**fields: Any) -> dict[str, Any]:
    base = {"v": 1, "type": "progress", "job_id": str(uuid.uuid4()), "progress": 0.5, "message": ""}
    return {**base, "seq": 1, "at": 1.0, "attempt": 1, **fields}


@pytest.mark.parametrize(
    "fields",
    [
        {"progress": 1.5},
        {"progress": "0.5"},
        {"seq": True},
        {"seq": 0},
        {"attempt": 0},
        {"v": 2},
        {"job_id": "not-a-uuid"},
        {"type": "status"},
    ],
    ids=repr,
)
def test_what_the_schema_refuses_the_sdk_refuses_too(fields: dict[str, Any]) -> None:
    document = _progress(**fields)
    assert not _schema("progress").is_valid(document)
    with pytest.raises(MalformedMessageError):
        contract.decode(contract.QueueKind.PROGRESS, json.dumps(document).encode(), None)


def test_what_the_sdk_sends_the_schema_accepts() -> None:
    job_id = uuid.uuid4()
    error = contract.JobError("ValueError", "no", "Traceback...", ("WARNING x: y",))
    result = contract.JobResult(
        job_id=job_id, status=JobStatus.ERROR, error=error, last_seq={"progress": 2}, at=2.0, attempt=2
    )
    assert _schema("result").is_valid(json.loads(contract.encode_message(result)))
    running = contract.JobResult(job_id=job_id, status=JobStatus.SUCCEEDED, at=1.0)
    assert not _schema("result").is_valid(
        {**json.loads(contract.encode_message(running)), "status": "RUNNING"}
    )
    request = contract.TaskRequest(
        job_id, "demo.sleep", {"seconds": 1}, frozenset(contract.QueueKind), 60.0, 5.0
    )
    assert _schema("task").is_valid(request.to_celery_arg())
    arguments = contract.job_queue_arguments(timedelta(hours=48), "quorum")
    assert arguments == {"x-expires": 172_800_000, "x-queue-type": "quorum"}
    assert _schema("job-queue-arguments").is_valid(arguments)
    assert not _schema("job-queue-arguments").is_valid({"x-expires": 0})


def test_the_probe_reports_a_message_that_breaks_the_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "probe.log"
    monkeypatch.setenv("EBB_TEST_CONTRACT_LOG", str(log))
    contract_probe.record("progress", _progress())
    contract_probe.record("progress", _progress(progress=2))
    lines = log.read_text().splitlines()
    assert lines[0] == "ok progress" and lines[1].startswith("VIOLATION progress: 2 is greater than")


def test_every_message_a_worker_publishes_is_checked_against_the_published_schema(
    client: JobClient,
) -> None:
    log = Path(os.environ["EBB_TEST_CONTRACT_LOG"])
    before = len(log.read_text().splitlines())
    job = client.submit_job("demo.sleep", {"seconds": 0.2, "steps": 2}, updates=True)
    assert client.wait(job, timeout=30).succeeded
    failed = client.submit_job("demo.fail", {"message": "checked"})
    assert client.wait(failed, timeout=30).status is JobStatus.ERROR
    lines = log.read_text().splitlines()[before:]
    # task, RUNNING, 2 progress, result (which carries SUCCEEDED: no final status message); then
    # the failing job's task and result (it asked for no updates, so it has no status queue)
    first = ["ok task", "ok status", "ok progress", "ok progress", "ok result"]
    assert sorted(lines) == sorted([*first, "ok task", "ok result"])


def test_a_task_request_that_breaks_the_contract_gets_an_error_result(
    settings: Settings, worker: Path
) -> None:
    """What a caller of another language sees when it gets the contract wrong: a result saying why."""
    job_id = uuid.uuid4()
    request = contract.TaskRequest(job_id, "demo.echo", {}, frozenset({contract.QueueKind.RESULT}), 30.0)
    message = TaskMessages().task(request)
    message.body = message.body.replace('"v":1', '"v":2')
    result_queue = contract.job_queue(job_id, contract.QueueKind.RESULT, timedelta(seconds=30))
    with Connection(settings.broker_url) as connection:
        channel = connection.channel()
        result_queue.queue_declare(channel=channel)
        channel.basic_publish(message, exchange="", routing_key=settings.task_queue)
        got: list[Any] = []

        def arrived() -> bool:
            got.append(channel.basic_get(result_queue.name, no_ack=True))
            return got[-1] is not None

        assert wait_until(arrived, 20)
        channel.queue_delete(result_queue.name)
    result = contract.decode(contract.QueueKind.RESULT, got[-1].body, got[-1].content_type)
    assert isinstance(result, contract.JobResult) and result.status is JobStatus.ERROR and result.error
    assert result.error.type == "MalformedMessageError"
    assert "schema version 2" in result.error.message and "upgrade the older side" in result.error.message
