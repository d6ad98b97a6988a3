"""The one exception tree of htcgrid_executor.

::

    GridError                         anything this package raises on purpose
    ├── ConfigurationError            a client config key is missing or malformed (names the key)
    ├── ControlPlaneError             the HTTP API answered with an error (status, message)
    │   ├── AuthenticationError       401/403, wrong credentials, Cognito refused, not authenticated
    │   │   └── PasswordChangeRequired  Cognito wants the temporary password changed first
    │   └── BadRequestError           4xx: the grid rejected the request as malformed (names the problem)
    ├── GridUnavailableError          the control plane or data plane cannot be reached (after retries)
    ├── StorageError                  the data plane failed a read or write
    ├── PayloadError                  a call, result or task cannot be encoded or decoded, or is
    │   │                             too large (also TypeError, as pickling errors are, and ValueError)
    │   └── SignatureError            a pickled payload's HMAC does not match: it is never unpickled
    ├── TaskFailedError               the grid marked a task failed (worker lost after its retries,
    │                                 time limit); ``.reason`` says why
    ├── RemoteError                   a task raised an exception that could not travel back as itself
    └── BrokenGridExecutor            (also concurrent.futures.BrokenExecutor) the executor cannot reach
                                      its grid any more; pending futures fail with it

Builtin ``TimeoutError`` and ``concurrent.futures.CancelledError`` are used as they are.
Errors from lower layers (redis, botocore, requests) are translated at the layer boundary
with ``raise X from exc`` so the original stays visible as ``__cause__``.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor

__all__ = [
    "GridError",
    "ConfigurationError",
    "ControlPlaneError",
    "AuthenticationError",
    "PasswordChangeRequired",
    "BadRequestError",
    "GridUnavailableError",
    "StorageError",
    "StorageFullError",
    "PayloadError",
    "SignatureError",
    "TaskFailedError",
    "RemoteError",
    "BrokenGridExecutor",
]


class GridError(Exception):
    """Root of every exception this package raises on purpose."""


class ConfigurationError(GridError, ValueError):
    """A client configuration key is missing or malformed; the message names the key."""


class ControlPlaneError(GridError):
    """The grid's HTTP API answered with an error.

    ``status`` is the HTTP status code (``None`` when there was no answer), ``message`` the
    server's text with no traceback.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})" if status is not None else message)
        self.status = status
        self.message = message


class AuthenticationError(ControlPlaneError):
    """Credentials are missing, wrong or expired (HTTP 401/403, or Cognito refused them)."""


class PasswordChangeRequired(AuthenticationError):
    """Cognito accepted the password but requires the user to set a new one before use."""


class BadRequestError(ControlPlaneError, ValueError):
    """The grid rejected a request as malformed (HTTP 4xx other than auth); message says why."""


class GridUnavailableError(GridError, ConnectionError):
    """The control plane or the data plane could not be reached, retries included."""


class StorageError(GridError):
    """The data plane (Redis or S3) failed a read or a write."""


class StorageFullError(StorageError):
    """The grid's Redis refuses writes: it is out of memory (``OOM``: maxmemory reached, and a
    grid never evicts) or cannot save to its disk (``MISCONF``: a full disk, usually). Nothing
    already stored is lost; the grid takes work again once memory or disk space is freed.
    ``status`` is the control plane's HTTP status (507) when it came from there, else None."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PayloadError(GridError, TypeError, ValueError):
    """A call, a result or a task could not be encoded or decoded, or is too large for the grid.

    A ``TypeError`` (what pickling raises, and so what ``ProcessPoolExecutor`` gives for an
    argument or a result that cannot be pickled) and, as before, a ``ValueError``."""


class SignatureError(PayloadError):
    """A pickled payload's HMAC did not match the grid secret; it was not unpickled."""


class TaskFailedError(GridError):
    """The grid gave up on a task: its worker was lost after the retry limit, or it ran over its
    time limit. ``reason`` is the grid's explanation, ``task_id`` the grid task."""

    def __init__(self, reason: str, task_id: str | None = None) -> None:
        super().__init__(f"task {task_id} failed on the grid: {reason}" if task_id else reason)
        self.reason = reason
        self.task_id = task_id


class RemoteError(GridError):
    """A task raised an exception that could not be sent back as itself (it could not be pickled).

    ``type_name`` is the qualified name of the original exception type; the remote traceback
    text is in ``remote_traceback``.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class BrokenGridExecutor(GridError, BrokenExecutor):
    """The executor lost its grid past its deadline; every pending future fails with this."""
