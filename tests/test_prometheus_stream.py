"""Reading rabbitmq_prometheus' per-queue answer as it streams in (no broker: the text format).

At 300,000 queues the answer is ~80 MB, read a megabyte at a time: a line cut by a chunk's end
must still be read whole, and a deleted queue's lingering row must not count as a queue.
"""

from __future__ import annotations

import io
import re
import uuid

import pytest

from ebb.config import Settings
from ebb.contract import QueueKind, queue_name
from ebb.errors import ConfigurationError
from tasks.broker_api import PROMETHEUS_JOB_QUEUE_LINE, STREAM_CHUNK, _matches, per_queue, queue_filters


def answer(queues: list[str], lingering: list[str]) -> bytes:
    """What RabbitMQ 4.3 sends for ``family=queue_consumer_count``: consumer rows (one per queue,
    and the deleted queues' that linger), then one ``queue_info`` row per queue that exists."""
    lines = ["# TYPE rabbitmq_detailed_queue_consumers gauge"]
    lines += [
        f'rabbitmq_detailed_queue_consumers{{vhost="/",queue="{q}"}} {i % 3}' for i, q in enumerate(queues)
    ]
    lines += [f'rabbitmq_detailed_queue_consumers{{vhost="/",queue="{q}"}} 0' for q in lingering]
    lines += [
        'rabbitmq_detailed_queue_consumers{vhost="other",queue="jobs.x.result"} 1',
        "# TYPE rabbitmq_detailed_queue_info gauge",
    ]
    info = 'rabbitmq_detailed_queue_info{{vhost="/",queue="{}",queue_type="rabbit_classic_queue"}} 1'
    lines += [info.format(q) for q in queues]
    lines.append(
        'rabbitmq_identity_info{rabbitmq_node="rabbit@h",rabbitmq_cluster="c",rabbitmq_endpoint="detailed"} 1'
    )
    return ("\n".join(lines) + "\n").encode()


def test_every_line_is_read_whole_though_the_answer_comes_a_megabyte_at_a_time() -> None:
    queues = [f"jobs.{uuid.uuid4()}.result" for _ in range(30_000)]
    text = answer(queues, lingering=[])
    assert len(text) > 3 * STREAM_CHUNK, "the answer must span several chunks"
    found = [m for m in _matches(io.BytesIO(text), PROMETHEUS_JOB_QUEUE_LINE) if m["vhost"] == b"/"]
    consumers = {m["queue"].decode(): int(m["value"]) for m in found if m["metric"] == b"consumers"}
    assert consumers == {q: i % 3 for i, q in enumerate(queues)}
    assert {m["queue"].decode() for m in found if m["metric"] == b"info"} == set(queues)


def test_a_deleted_queues_lingering_row_is_no_queue_and_a_queue_without_its_count_is_unknown() -> None:
    queues = [f"jobs.{uuid.uuid4()}.status" for _ in range(5)]
    gone = f"jobs.{uuid.uuid4()}.result"
    text = answer(queues[:4], lingering=[gone])
    info = (
        f'rabbitmq_detailed_queue_info{{vhost="/",queue="{queues[4]}",queue_type="rabbit_classic_queue"}} 1\n'
    )
    found = dict(
        per_queue(
            _matches(io.BytesIO(text + info.encode()), PROMETHEUS_JOB_QUEUE_LINE),
            "/",
            b"consumers",
            present_only=True,
        )
    )
    assert found == {**{q: i % 3 for i, q in enumerate(queues[:4])}, queues[4]: None}
    assert gone not in found, "a deleted queue must be reported gone, not kept alive by its old row"
    every_row = dict(per_queue(_matches(io.BytesIO(text), PROMETHEUS_JOB_QUEUE_LINE), "/", b"consumers"))
    assert gone in every_row and "jobs.x.result" not in every_row  # other vhosts never count


def test_each_queues_count_is_reported_before_it_is_handed_out_and_deleted_queues_only_counted() -> None:
    queues = [f"jobs.{uuid.uuid4()}.result" for _ in range(50)]
    gone = f"jobs.{uuid.uuid4()}.status"
    counted: list[tuple[str, int]] = []
    found = per_queue(
        _matches(io.BytesIO(answer(queues, lingering=[gone])), PROMETHEUS_JOB_QUEUE_LINE),
        "/",
        b"consumers",
        present_only=True,
        on_counted=lambda name, value: counted.append((name, value)),
    )

    first = next(found)
    # The caller starts on every count while the node still lists which queues exist.
    assert counted == [*((q, i % 3) for i, q in enumerate(queues)), (gone, 0)]
    counted_before_first = len(counted)
    handed = [first, *found]
    assert len(counted) == counted_before_first, "no queue counted twice, none counted late"
    assert handed == [(q, i % 3) for i, q in enumerate(queues)]
    assert gone not in dict(handed), "a deleted queue's lingering row is counted, never handed out"
    assert all(name != "jobs.x.result" for name, _ in counted + handed), "another vhost's queue"


@pytest.mark.parametrize("shares", [1, 2, 3, 5, 16, 40])
def test_the_shares_an_audit_reads_at_once_hold_every_job_queue_once_and_a_jobs_queues_together(
    shares: int,
) -> None:
    """RabbitMQ 4.3's ``queue`` filter is a PCRE regex; these use nothing Python's ``re`` reads
    otherwise. A queue in no share would never be judged; one in two, judged twice."""
    filters = queue_filters(shares)
    assert len(filters) == min(shares, 16)
    jobs = [uuid.UUID(first + uuid.uuid4().hex[1:]) for first in "0123456789abcdef" for _ in range(20)]
    names = [queue_name(job, kind) for job in jobs for kind in QueueKind]
    names += ["jobs.", "jobs.Z.result", "jobs.-.status", "jobs.\u00e9t\u00e9.result"]  # no UUID: still judged
    for name in names:
        holding = [f for f in filters if f is None or re.search(f, name)]
        assert len(holding) == 1, (name, holding)
    for job in jobs:
        homes = {next(f for f in filters if f is None or re.search(f, queue_name(job, k))) for k in QueueKind}
        assert len(homes) == 1, job
    if shares > 1:
        biggest = max(sum(1 for n in names if re.search(f or "", n)) for f in filters)
        per_digit = 3 * 20
        assert biggest <= -(-16 // len(filters)) * per_digit + 4, "no share holds more than its digits' jobs"


@pytest.mark.parametrize(
    ("value", "problem"), [("0", "at least 1"), ("17", "at most 16"), ("two", "whole number")]
)
def test_a_number_of_audit_streams_it_cannot_use_is_refused_with_what_to_set(
    value: str, problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"EBB_AUDIT_STREAMS.*{problem}"):
        Settings.from_env({"EBB_AUDIT_STREAMS": value})
    assert Settings.from_env({"EBB_AUDIT_STREAMS": "16"}).audit_streams == 16
    assert Settings.from_env({}).audit_streams == 2
