"""One error root: every error Ebb raises on purpose is an ``EbbError`` a caller can import from ``ebb``."""

from __future__ import annotations

import inspect

import ebb
from ebb import errors
from tasks import workflows
from tasks.broker_api import ManagementError


def test_every_error_class_is_an_ebb_error_exported_from_ebb() -> None:
    classes = [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    ]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, ebb.EbbError), cls
        assert getattr(ebb, cls.__name__) is cls, f"{cls.__name__} is not exported from ebb"


def test_worker_and_operator_errors_share_the_root() -> None:
    assert issubclass(ManagementError, ebb.UnavailableError)
    try:
        workflows.get("no.such.workflow")
    except ebb.UnknownWorkflowError as exc:  # the same class the caller catches at submit
        assert "no.such.workflow" in str(exc)
    else:
        raise AssertionError("an unknown workflow was found")


def test_bad_input_errors_stay_value_and_type_errors() -> None:
    """Code written against ValueError/TypeError keeps working: Ebb's errors subclass them."""
    assert issubclass(ebb.InvalidArgumentError, ValueError)
    assert issubclass(ebb.InvalidArgumentTypeError, TypeError)
    assert issubclass(ebb.WaitTimeoutError, TimeoutError)
    assert issubclass(ebb.BrokerUnavailableError, ConnectionError)
