"""The Celery application every Ebb worker, beat and Flower process loads (``celery -A tasks``).

Its settings come from the ``celeryconfig.py`` that sits next to this package, loaded by path:
loading it by module name would pick up whatever ``celeryconfig`` comes first on ``sys.path``,
such as a user's own from a Celery tutorial. Ebb's tasks are registered on it by
:func:`tasks.install.install`, the same call that puts them on an app of your own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from celery import Celery

from tasks.install import install

CONFIG_FILE = Path(__file__).resolve().parent.parent / "celeryconfig.py"


def _load_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ebb_celeryconfig", CONFIG_FILE)
    if spec is None or spec.loader is None:
        raise ImportError(f"Ebb's Celery settings {CONFIG_FILE} are missing; reinstall the service")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Not the process's "current" app: an app of your own that imports ``tasks`` stays current.
# (A worker started with ``-A tasks`` makes this one current itself.)
app = Celery("ebb", set_as_current=False)
app.config_from_object(_load_config())
install(app)
