"""The one exception tree of htcgrid_executor: one class per condition a user can act on.

::

    GridError                         anything this package raises on purpose
    ├── ConfigurationError            raised when a client config key (or config file) is missing
    │                                 or malformed; the message names the key
    ├── ControlPlaneError             raised when the HTTP API answers with an error (status, message)
    │   ├── AuthenticationError       raised when the grid answers 401/403, Cognito refuses the
    │   │   │                         login, or a call comes before authenticate()
    │   │   └── PasswordChangeRequired  raised when Cognito wants the temporary password changed
    │   └── BadRequestError           raised when a request is malformed: the grid answered 4xx, or
    │                                 the connector refused the argument before sending it (a
    │                                 ValueError: the same bad id is the same error on either side)
    ├── ConnectorClosedError          raised when a call is made on a closed AWSConnector (also a
    │                                 RuntimeError, as a closed file's is a ValueError)
    ├── GridUnavailableError          raised when the control plane or data plane cannot be
    │                                 reached, after retries
    ├── StorageError                  raised when the data plane refuses or fails a read or write
    │   └── StorageFullError          raised when the grid's Redis refuses writes (OOM, MISCONF)
    ├── PayloadError                  raised when a call, result or task cannot be encoded or
    │   │                             decoded, or is too large (also TypeError, as pickling
    │   │                             errors are, and ValueError)
    │   └── SignatureError            raised when a pickled payload's HMAC does not match: it is
    │                                 never unpickled
    ├── TaskFailedError               set on a future when the grid marked its task failed (worker
    │                                 lost after its retries, time limit); ``.reason`` says why
    ├── RemoteError                   set on a future when its task raised an exception that could
    │                                 not travel back as itself
    └── BrokenGridExecutor            raised when the executor cannot reach its grid any more (also
                                      concurrent.futures.BrokenExecutor); pending futures fail with it

Local argument errors that name no grid request (a wrong type, a bad count) are plain
``TypeError``/``ValueError``. Builtin ``TimeoutError`` and ``concurrent.futures.CancelledError``
are used as they are. Errors from lower layers (redis, botocore, urllib3) are translated at the
layer boundary, each backend by one context manager (``dataplane._redis_errors``,
``dataplane._s3_errors``, ``auth._cognito_errors``, ``transport._http_errors``), with the
original kept as ``__cause__``.
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
    "ConnectorClosedError",
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
    """A request is malformed; the message says why. Raised for a 4xx answer other than auth
    (``status`` the HTTP status), and by the connector for an argument the grid would reject
    (an id that is not one, a submission response of the wrong shape; ``status`` None)."""


class ConnectorClosedError(GridError, RuntimeError):
    """A call was made on an :class:`~htcgrid_executor.connector.AWSConnector` after its
    ``close()`` (or on its transport, when ``close()`` ran during the call)."""


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
