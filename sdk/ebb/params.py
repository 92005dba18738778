"""A workflow's params checked against the JSON Schema its workers advertise, before any queue exists.

The caller needs no worker code for this, only the schema: it is validated with ``jsonschema``
(python-jsonschema, Draft 2020-12; ``date-time`` and ``duration`` formats are checked too), and
the schema's top-level defaults are filled in, so the worker receives what the caller saw.
The worker validates again with its pydantic model when the job starts; adverts can be stale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from referencing.exceptions import Unresolvable

from ebb.errors import InvalidParamsError
from ebb.logfmt import log_event

logger = logging.getLogger("ebb.client")

_FORMATS: Final = Draft202012Validator.FORMAT_CHECKER
_NO_DEFAULT: Final = object()


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as ``ebb workflows`` shows it."""

    name: str
    type: str
    required: bool
    default: Any = _NO_DEFAULT
    description: str = ""

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json), format_checker=_FORMATS)


def validator(schema: Mapping[str, Any]) -> Draft202012Validator:
    """A compiled validator, kept per schema: adverts repeat, so each is built once."""
    return _validator(json.dumps(schema, sort_keys=True))


def usable(schema: Mapping[str, Any]) -> bool:
    """Whether an advertised schema is a valid JSON Schema (a broken advert must not block submits)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError:
        return False
    return True


def apply(workflow: str, schema: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the schema's defaults filled in; :class:`InvalidParamsError` if they do not fit.

    A schema that cannot be applied (a ``$ref`` to nothing) is logged and skipped: the worker's
    own model still judges the params.
    """
    filled = dict(params)
    for name, spec in _properties(schema).items():
        if name not in filled and "default" in spec:
            filled[name] = spec["default"]
    try:
        error = best_match(validator(schema).iter_errors(filled))
    except (SchemaError, Unresolvable) as exc:
        log_event(logger, logging.WARNING, "workflow_schema_unusable", workflow=workflow, error=exc)
        return dict(params)
    if error is not None:
        raise _explain(workflow, schema, filled, error)
    return filled


def coerce(workflow: str, schema: Mapping[str, Any], raw: Mapping[str, str]) -> dict[str, Any]:
    """Command-line ``key=value`` strings turned into the schema's types (``seconds=2.5`` is a float).

    A string parameter keeps its text as given; anything else is read as the type its schema
    names, or as JSON when it names none. A value that cannot be read raises
    :class:`InvalidParamsError` naming the field.
    """
    properties = _properties(schema)
    out: dict[str, Any] = {}
    for key, text in raw.items():
        spec = properties.get(key)
        types = _types(schema, spec) if spec is not None else []
        try:
            out[key] = _read(text, types)
        except ValueError:
            expected = " or ".join(types) if types else "a JSON value"
            raise InvalidParamsError(workflow, key, text, expected) from None
    return out


def describe(schema: Mapping[str, Any] | None) -> list[ParamInfo]:
    """Every top-level parameter with its type (and constraints), default and whether it is required."""
    if not schema:
        return []
    required = set(schema.get("required", ()))
    return [
        ParamInfo(
            name=name,
            type=_type_text(schema, spec),
            required=name in required,
            default=spec.get("default", _NO_DEFAULT),
            description=str(spec.get("description", "")),
        )
        for name, spec in _properties(schema).items()
    ]


# --- reading a schema ------------------------------------------------------------------------


def _properties(schema: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    props = schema.get("properties", {})
    return props if isinstance(props, dict) else {}


def _resolve(schema: Mapping[str, Any], spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local ``$ref`` (pydantic puts enums and nested models under ``$defs``)."""
    ref = spec.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"))
        if isinstance(target, dict):
            return {**target, **{k: v for k, v in spec.items() if k != "$ref"}}
    return spec


def _branches(schema: Mapping[str, Any], spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = _resolve(schema, spec)
    options = spec.get("anyOf") or spec.get("oneOf")
    if isinstance(options, list):
        return [_resolve(schema, option) for option in options if isinstance(option, dict)]
    return [spec]


def _types(schema: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    types: list[str] = []
    for branch in _branches(schema, spec):
        kind = branch.get("type")
        if isinstance(kind, list):
            types.extend(str(k) for k in kind)
        elif isinstance(kind, str):
            types.append(kind)
        elif "enum" in branch:
            types.extend(sorted({_json_type(v) for v in branch["enum"]}))
    return types


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def _type_text(schema: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    parts = []
    for branch in _branches(schema, spec):
        if "enum" in branch:
            parts.append("|".join(json.dumps(v) for v in branch["enum"]))
            continue
        if "const" in branch:
            parts.append(json.dumps(branch["const"]))
            continue
        text = str(branch.get("type", "any"))
        if "format" in branch:
            text += f" ({branch['format']})"
        bounds = [
            f"{symbol} {branch[key]}"
            for key, symbol in (
                ("minimum", ">="),
                ("exclusiveMinimum", ">"),
                ("maximum", "<="),
                ("exclusiveMaximum", "<"),
                ("minLength", "length >="),
                ("maxLength", "length <="),
            )
            if key in branch
        ]
        parts.append(" ".join([text, *bounds]))
    return " or ".join(parts)


_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})


def _read(text: str, types: list[str]) -> Any:
    if not types:
        try:
            return json.loads(text)
        except ValueError:
            return text
    if "null" in types and text.strip().lower() in ("null", "none"):
        return None
    for kind in types:
        try:
            return _read_as(text, kind)
        except ValueError:
            continue
    raise ValueError(text)


def _read_as(text: str, kind: str) -> Any:
    if kind == "string":
        return text
    if kind == "integer":
        return int(text)
    if kind == "number":
        value = float(text)
        return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
    if kind == "boolean":
        lowered = text.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ValueError(text)
    if kind == "null":
        if text.strip().lower() in ("null", "none", ""):
            return None
        raise ValueError(text)
    value = json.loads(text)  # array, object
    if _json_type(value) != kind and not (kind == "array" and isinstance(value, list)):
        raise ValueError(text)
    return value


# --- saying what is wrong ---------------------------------------------------------------------


def _explain(
    workflow: str, schema: Mapping[str, Any], params: Mapping[str, Any], error: ValidationError
) -> InvalidParamsError:
    path = list(error.absolute_path)
    if error.validator == "required":
        wanted = error.validator_value if isinstance(error.validator_value, list) else []
        missing = next((name for name in wanted if name not in params), None)
        return InvalidParamsError(
            workflow, missing, InvalidParamsError.MISSING, "a value (it has no default)"
        )
    if error.validator in ("additionalProperties", "unevaluatedProperties") and not path:
        known = sorted(_properties(schema))
        extra = next((name for name in params if name not in known), "?")
        return InvalidParamsError.unknown(workflow, extra, params.get(extra), known)
    field = ".".join(str(p) for p in path) if path else None
    return InvalidParamsError(workflow, field, error.instance, _expected(error))


def _expected(error: ValidationError) -> str:
    if error.validator in ("anyOf", "oneOf") and isinstance(error.validator_value, list):
        return " or ".join(_type_text({}, option) for option in error.validator_value)
    text = _keyword_text(str(error.validator), error.validator_value)
    if text is not None:
        return text
    schema = error.schema if isinstance(error.schema, dict) else {}
    return f"{error.message} (schema: {json.dumps(schema)[:120]})"


def _keyword_text(keyword: str, value: Any) -> str | None:
    """What a schema keyword wants, in the words both sides use."""
    match keyword:
        case "type":
            return " or ".join(value) if isinstance(value, list) else str(value)
        case "minimum":
            return f"a number >= {value}"
        case "exclusiveMinimum":
            return f"a number > {value}"
        case "maximum":
            return f"a number <= {value}"
        case "exclusiveMaximum":
            return f"a number < {value}"
        case "enum":
            return "one of " + ", ".join(json.dumps(v) for v in value)
        case "format":
            return f"a {value} string ({'ISO 8601, e.g. P1DT2H' if value == 'duration' else 'ISO 8601'})"
    return None


def expected(schema: Mapping[str, Any], field: str, keyword: str) -> str | None:
    """What ``field``'s schema wants under ``keyword``, worded as the submit-time check words it.

    For the worker, so that its own model's refusals read like the caller's (``None`` when the
    schema has no such keyword for that field).
    """
    spec = _properties(schema).get(field)
    if spec is None:
        return None
    for branch in _branches(schema, spec):
        if keyword == "type" and branch.get("type") == "null":
            continue
        if keyword in branch:
            return _keyword_text(keyword, branch[keyword])
    return None
