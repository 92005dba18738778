"""Typed workflows end to end: checked at submit from the adverts, and again by the worker."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
import redis

from ebb import InvalidParamsError, JobClient, JobStatus
from ebb.config import Settings
from ebb.contract import JobStatus as Status
from ebb.records import WORKERS_KEY_PREFIX
from ebb.workers import advertisement
from tests.conftest import AnyClient
from tests.support import Management


def test_a_bad_param_is_refused_at_submit_before_any_queue_exists(
    any_client: AnyClient, management: Management
) -> None:
    before = set(management.all_job_queue_names())
    with pytest.raises(InvalidParamsError, match="parameter 'seconds' = 'abc': expected number") as caught:
        any_client.submit_job("demo.sleep", {"seconds": "abc"})
    assert caught.value.field == "seconds" and caught.value.value == "abc"
    assert isinstance(caught.value, ValueError)
    with pytest.raises(InvalidParamsError, match="'steps' = 0: expected a number >= 1"):
        any_client.submit_job("demo.sleep", {"seconds": 1, "steps": 0})
    assert set(management.all_job_queue_names()) <= before


def test_the_advertised_schema_is_listed_and_its_defaults_are_applied(any_client: AnyClient) -> None:
    sleep = next(w for w in any_client.list_workflows() if w.name == "demo.sleep")
    assert sleep.params == ("seconds", "steps")
    described = {p.name: (p.type, p.default, p.required) for p in sleep.parameters()}
    assert described == {"seconds": ("number >= 0", 1.0, False), "steps": ("integer >= 1 <= 10000", 1, False)}
    assert sleep.check({"seconds": 0.1}) == {"seconds": 0.1, "steps": 1}
    job = any_client.submit_job("demo.sleep", {"seconds": 0.1}, on_progress=lambda j, p: None)
    result = any_client.wait(job, timeout=30)
    assert result.status is JobStatus.SUCCEEDED and result.output == {"slept": 0.1}


def test_the_worker_validates_again_and_never_runs_a_job_with_bad_params(
    settings: Settings, worker: Path
) -> None:
    # With the submit-time check off (as with a stale advert), only the worker's model is left.
    unchecked = dataclasses.replace(settings, check_workflows=False)
    statuses: list[Status] = []
    with JobClient(settings=unchecked) as client:
        job = client.submit_job(
            "demo.sleep", {"seconds": "abc"}, on_status=lambda j, s: statuses.append(s.status)
        )
        result = client.wait(job, timeout=30)
        record = client.job_status(job)
    assert result.status is JobStatus.ERROR and result.error is not None
    assert result.error.type == "InvalidParamsError"
    # The same words as the submit-time check would have used
    assert result.error.message == "workflow 'demo.sleep': parameter 'seconds' = 'abc': expected number"
    assert statuses == [JobStatus.ERROR]  # never RUNNING
    assert record.status == "ERROR" and record.started_at is None


def test_an_untyped_workflow_still_gets_a_plain_dict(any_client: AnyClient) -> None:
    marker = str(uuid.uuid4())
    job = any_client.submit_job("demo.echo", {"anything": marker, "n": 2.5})
    assert any_client.wait(job, timeout=30).output == {"anything": marker, "n": 2.5}


def test_a_broken_advert_is_listed_untyped_and_blocks_nothing(
    settings: Settings, any_client: AnyClient
) -> None:
    store = redis.Redis.from_url(settings.redis_url)
    key = f"{WORKERS_KEY_PREFIX}broken-{uuid.uuid4().hex[:6]}"
    broken = [{"name": "broken.flow", "description": "", "params": ["x"], "schema": {"type": 5}}]
    store.set(key, advertisement("broken@host", settings.task_queue, broken), ex=30)
    try:
        info = next(w for w in any_client.list_workflows() if w.name == "broken.flow")
        assert info.schema is None and info.params == ("x",) and info.check({"x": 1}) == {"x": 1}
    finally:
        store.delete(key)
