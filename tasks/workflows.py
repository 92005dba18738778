"""Workflows are plain functions registered by name: ``fn(params, progress) -> output``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ebb.errors import UnknownWorkflowError


class Progress(Protocol):
    def __call__(self, fraction: float, message: str = "") -> None: ...


Workflow = Callable[[dict[str, Any], Progress], Any]

_registry: dict[str, Workflow] = {}
_params: dict[str, tuple[str, ...]] = {}


def workflow(name: str, params: Iterable[str] = ()) -> Callable[[Workflow], Workflow]:
    """Register ``fn`` under ``name``; ``params`` names its parameters for callers to discover.

    The first line of the function's docstring is its advertised description. A second
    registration under the same name is a mistake.
    """

    def register(fn: Workflow) -> Workflow:
        existing = _registry.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"workflow {name!r} is already registered by {existing.__module__}")
        _registry[name] = fn
        _params[name] = tuple(params)
        return fn

    return register


def describe() -> list[dict[str, Any]]:
    """What this worker advertises: name, description and parameter names of each workflow."""
    return [
        {
            "name": name,
            "description": (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
            "params": list(_params.get(name, ())),
        }
        for name, fn in sorted(_registry.items())
    ]


def get(name: str) -> Workflow:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownWorkflowError(name, sorted(_registry)) from None


def names() -> list[str]:
    return sorted(_registry)


def load_modules(modules: Iterable[str]) -> None:
    """Import the modules that register workflows (the built-in demos and ``EBB_WORKFLOW_MODULES``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"cannot import workflow module {module!r} from EBB_WORKFLOW_MODULES: {exc}"
            ) from exc
