"""Typed params without a broker: the caller's schema check and the worker's model agree.

The schema is the one a worker advertises (pydantic's JSON Schema of the workflow's model);
the caller checks it with jsonschema alone, the worker with the model. Both say which field,
what was given and what was expected.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from ebb.errors import InvalidParamsError
from ebb.params import apply, coerce, describe, usable
from examples.my_workflows import BuildParams
from tasks.workflows import Registered

SCHEMA = BuildParams.model_json_schema()
WORKER = Registered(
    fn=lambda params, progress: None, model=BuildParams, names=tuple(BuildParams.model_fields)
)


def test_every_parameter_is_described_with_type_default_and_whether_required() -> None:
    shown = {p.name: p for p in describe(SCHEMA)}
    assert list(shown) == ["title", "format", "pages", "scale", "draft", "since", "window"]
    assert shown["title"].required and not shown["title"].has_default
    assert shown["title"].description == "Printed on the first page"
    assert shown["format"].type == '"pdf"|"csv"' and shown["format"].default == "pdf"
    assert shown["pages"].type == "integer >= 1 <= 500" and shown["pages"].default == 10
    assert shown["scale"].type == "number > 0 <= 4"
    assert shown["draft"].type == "boolean" and shown["draft"].default is False
    assert shown["since"].type == "string (date-time) or null"
    assert shown["window"].type == "string (duration)" and shown["window"].default == "P7D"
    assert describe(None) == []


def test_defaults_are_filled_in_and_the_worker_reads_them_the_same() -> None:
    filled = apply("reports.build", SCHEMA, {"title": "Q3"})
    assert filled == {
        "title": "Q3",
        "format": "pdf",
        "pages": 10,
        "scale": 1.0,
        "draft": False,
        "since": None,
        "window": "P7D",
    }
    model = WORKER.params("reports.build", filled)
    assert isinstance(model, BuildParams) and model.window == timedelta(days=7)


@pytest.mark.parametrize(
    ("params", "field", "expected"),
    [
        ({"pages": "3"}, "pages", "expected integer"),
        ({"pages": 0}, "pages", "expected a number >= 1"),
        ({"pages": 501}, "pages", "expected a number <= 500"),
        ({"scale": 0}, "scale", "expected a number > 0"),
        ({"format": "doc"}, "format", 'expected one of "pdf", "csv"'),
        ({"draft": "yes"}, "draft", "expected boolean"),
        ({"since": "yesterday"}, "since", "expected a date-time string"),
        ({"window": "1h"}, "window", "expected a duration string"),
    ],
)
def test_a_bad_value_names_the_field_the_value_and_what_was_expected(
    params: dict[str, Any], field: str, expected: str
) -> None:
    with pytest.raises(InvalidParamsError, match=expected) as caught:
        apply("reports.build", SCHEMA, {"title": "Q3", **params})
    assert caught.value.field == field and caught.value.value == params[field]
    assert isinstance(caught.value, ValueError)
    assert f"parameter {field!r} = {params[field]!r}" in str(caught.value)
    # The worker's model refuses the same params, for the same field, in the same words.
    with pytest.raises(InvalidParamsError) as at_start:
        WORKER.params("reports.build", {"title": "Q3", **params})
    assert at_start.value.field == field and at_start.value.value == params[field]
    assert str(at_start.value) == str(caught.value)


def test_missing_and_unknown_parameters() -> None:
    with pytest.raises(InvalidParamsError, match="'title' = <missing>: expected a value") as caught:
        apply("reports.build", SCHEMA, {})
    assert caught.value.field == "title"
    with pytest.raises(InvalidParamsError, match=r"no parameter 'titel' \(it takes: draft, format"):
        apply("reports.build", SCHEMA, {"title": "Q3", "titel": "typo"})
    for params in ({}, {"title": "Q3", "titel": "typo"}):
        with pytest.raises(InvalidParamsError) as at_start:
            WORKER.params("reports.build", params)
        assert at_start.value.field == ("title" if not params else "titel")
        with pytest.raises(InvalidParamsError) as at_submit:
            apply("reports.build", SCHEMA, params)
        assert str(at_start.value) == str(at_submit.value)


def test_command_line_strings_become_the_schemas_types() -> None:
    raw = {"title": "2024", "pages": "3", "scale": "2.5", "draft": "yes", "window": "PT1H"}
    assert coerce("reports.build", SCHEMA, raw) == {
        "title": "2024",  # a string parameter keeps its text, even when it looks like a number
        "pages": 3,
        "scale": 2.5,
        "draft": True,
        "window": "PT1H",
    }
    assert coerce("reports.build", SCHEMA, {"since": "null"}) == {"since": None}
    with pytest.raises(InvalidParamsError, match="'pages' = 'three': expected integer") as caught:
        coerce("reports.build", SCHEMA, {"pages": "three"})
    assert caught.value.field == "pages"
    with pytest.raises(InvalidParamsError, match="'draft' = 'maybe': expected boolean"):
        coerce("reports.build", SCHEMA, {"draft": "maybe"})


def test_without_a_schema_values_are_read_as_json_when_they_parse() -> None:
    assert coerce("demo.echo", {}, {"n": "2.5", "word": "abc", "list": "[1, 2]"}) == {
        "n": 2.5,
        "word": "abc",
        "list": [1, 2],
    }


def test_a_broken_schema_never_blocks_a_submit() -> None:
    dangling = {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}
    assert apply("w", dangling, {"a": 1}) == {"a": 1}  # logged, left to the worker's model
    assert not usable({"type": 5}) and usable(SCHEMA)
