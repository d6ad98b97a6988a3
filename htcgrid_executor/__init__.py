"""htcgrid_executor: run Python code on an HTC-Grid through ``concurrent.futures.Executor``.

``HTCGridExecutor`` is a drop-in for ``ProcessPoolExecutor``; with no deployment configured it
starts an embedded :class:`LocalGrid` (a real Redis, the HTC-Grid HTTP routes, agent processes).
``AWSConnector`` is HTC-Grid's client API. Heavy parts are imported lazily, so
``import htcgrid_executor`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    BadRequestError,
    BrokenGridExecutor,
    ConfigurationError,
    ConnectorClosedError,
    ControlPlaneError,
    GridError,
    GridUnavailableError,
    PasswordChangeRequired,
    PayloadError,
    RemoteError,
    SignatureError,
    StorageError,
    StorageFullError,
    TaskFailedError,
)
from .states import TaskState

__version__ = "0.1.0"

__all__ = [
    "HTCGridExecutor",
    "AWSConnector",
    "LocalGrid",
    "lambda_handler",
    "TaskState",
    "GridError",
    "ConfigurationError",
    "ControlPlaneError",
    "AuthenticationError",
    "PasswordChangeRequired",
    "BadRequestError",
    "ConnectorClosedError",
    "GridUnavailableError",
    "StorageError",
    "StorageFullError",
    "PayloadError",
    "SignatureError",
    "TaskFailedError",
    "RemoteError",
    "BrokenGridExecutor",
    "__version__",
]

# name -> module that defines it; loaded on first attribute access (PEP 562)
_LAZY = {
    "HTCGridExecutor": ".executor",
    "AWSConnector": ".connector",
    "LocalGrid": ".grid",
    "lambda_handler": ".worker",
}

if TYPE_CHECKING:  # pragma: no cover
    from .connector import AWSConnector
    from .executor import HTCGridExecutor
    from .grid import LocalGrid
    from .worker import lambda_handler


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'htcgrid_executor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
