"""The ack plan both clients send at the end of a burst: no broker needed (the transport-free part)."""

from __future__ import annotations

from ebb.acks import AckBatch, AckPlan


def test_a_burst_of_settled_deliveries_is_one_multiple_ack() -> None:
    batch = AckBatch()
    for tag in (1, 2, 3, 4):
        batch.delivered(tag)
    for tag in (2, 1, 4, 3):
        batch.ack(tag)
    assert batch.take() == AckPlan(multiple_up_to=4, singles=())
    assert batch.take() is None  # sent once


def test_an_unsettled_delivery_holds_the_multiple_ack_below_it() -> None:
    """A result waiting for its stragglers (tag 2) must not be acked by a multiple-ack."""
    batch = AckBatch()
    for tag in (1, 2, 3, 4):
        batch.delivered(tag)
    for tag in (1, 3, 4):
        batch.ack(tag)
    assert batch.take() == AckPlan(multiple_up_to=1, singles=(3, 4))
    batch.ack(2)
    assert batch.take() == AckPlan(multiple_up_to=2, singles=())


def test_a_requeued_delivery_no_longer_holds_the_batch_back() -> None:
    batch = AckBatch()
    for tag in (1, 2, 3):
        batch.delivered(tag)
    batch.settled_otherwise(1)  # rejected with requeue, sent at once by the client
    batch.ack(2)
    batch.ack(3)
    assert batch.pending == 2
    assert batch.take() == AckPlan(multiple_up_to=3, singles=())


def test_a_lost_channel_forgets_everything() -> None:
    batch = AckBatch()
    batch.delivered(1)
    batch.ack(1)
    batch.delivered(2)
    batch.clear()
    assert batch.take() is None
    batch.delivered(1)  # tags start again on the new channel
    batch.ack(1)
    assert batch.take() == AckPlan(multiple_up_to=1, singles=())
