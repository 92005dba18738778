"""Workflows are plain functions registered by name: ``fn(params, progress) -> output``.

A workflow declares its params either as a pydantic model (typed: validated when the job
starts, advertised as JSON Schema so callers check them at submit) or as a tuple of names
(untyped: it receives the plain dict, as before).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from ebb.errors import InvalidParamsError, UnknownWorkflowError
from ebb.params import expected


class Progress(Protocol):
    def __call__(self, fraction: float, message: str = "") -> None: ...


Workflow = Callable[[Any, Progress], Any]


@dataclass(frozen=True)
class Registered:
    fn: Workflow
    model: type[BaseModel] | None
    names: tuple[str, ...]

    def params(self, name: str, raw: dict[str, Any]) -> Any:
        """What ``fn`` receives: the validated model, or the dict as given for an untyped workflow."""
        if self.model is None:
            return raw
        try:
            # Strict, and from JSON: the same rules as the JSON Schema callers check against
            # (no "3" for an integer), while dates and durations are read from their ISO text.
            return self.model.model_validate_json(json.dumps(raw), strict=True)
        except ValidationError as exc:
            raise invalid_params(name, self.model, exc) from None


_registry: dict[str, Registered] = {}


def workflow(name: str, params: type[BaseModel] | Iterable[str] = ()) -> Callable[[Workflow], Workflow]:
    """Register ``fn`` under ``name``; ``params`` is its pydantic model, or the names it reads.

    The first line of the function's docstring is its advertised description. A second
    registration under the same name is a mistake.
    """
    model = params if isinstance(params, type) and issubclass(params, BaseModel) else None
    names = tuple(model.model_fields) if model is not None else tuple(params)  # type: ignore[arg-type]

    def register(fn: Workflow) -> Workflow:
        existing = _registry.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"workflow {name!r} is already registered by {existing.fn.__module__}")
        _registry[name] = Registered(fn, model, names)
        return fn

    return register


#: pydantic's error types, by the JSON Schema keyword they enforce.
_KEYWORDS = {
    "greater_than_equal": "minimum",
    "greater_than": "exclusiveMinimum",
    "less_than_equal": "maximum",
    "less_than": "exclusiveMaximum",
    "literal_error": "enum",
    "enum": "enum",
}


def _keyword(error_type: str) -> str:
    if error_type in _KEYWORDS:
        return _KEYWORDS[error_type]
    if error_type.startswith(("datetime_", "time_delta_", "date_", "time_")):
        return "format"
    return "type"


def invalid_params(name: str, model: type[BaseModel], exc: ValidationError) -> InvalidParamsError:
    """The first of pydantic's complaints, worded as the caller's submit-time check words it."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "missing":
        return InvalidParamsError(name, field, InvalidParamsError.MISSING, "a value (it has no default)")
    if first["type"] == "extra_forbidden" and field is not None:
        return InvalidParamsError.unknown(name, field, first["input"], sorted(model.model_fields))
    schema = model.model_json_schema()
    wanted = expected(schema, field, _keyword(first["type"])) if field else None
    return InvalidParamsError(name, field, first["input"], wanted or first["msg"].lower())


def describe() -> list[dict[str, Any]]:
    """What this worker advertises: each workflow's name, description, param names and schema."""
    return [
        {
            "name": name,
            "description": (entry.fn.__doc__ or "").strip().splitlines()[0] if entry.fn.__doc__ else "",
            "params": list(entry.names),
            "schema": entry.model.model_json_schema() if entry.model is not None else None,
        }
        for name, entry in sorted(_registry.items())
    ]


def get(name: str) -> Registered:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownWorkflowError(name, sorted(_registry)) from None


def names() -> list[str]:
    return sorted(_registry)


def runs(name: str) -> bool:
    """Does this worker run ``name``? (A lookup, not a sorted list: asked per job.)"""
    return name in _registry


def load_modules(modules: Iterable[str]) -> None:
    """Import the modules that register workflows (the built-in demos and ``EBB_WORKFLOW_MODULES``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"cannot import workflow module {module!r} from EBB_WORKFLOW_MODULES: {exc}"
            ) from exc
