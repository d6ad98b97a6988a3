"""The connector the executor layer depends on, declared: exactly the members of
:class:`~htcgrid_executor.AWSConnector` that ``executor.py`` and its private modules use.

The executor knows these methods, never how they are carried out (HTTP, Redis, S3): anything
that has them can stand behind an executor. ``tests/executor/test_connector_protocol.py``
checks both halves: ``AWSConnector`` provides every member, and the executor modules use no
other member of a connector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from .connector.client import ResultBatch
    from .connector.config import ClientConfig
    from .options import TaskOptions

__all__ = ["GridConnector", "TaskStore"]


class TaskStore(Protocol):
    """The data plane, for the executor's own keys: inputs of adopted tasks, shared objects."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def put_many(self, items: Mapping[str, bytes], *, expire_sec: float | None = None) -> None: ...

    def delete_many(self, keys: Iterable[str]) -> None: ...


@runtime_checkable
class GridConnector(Protocol):
    """What an executor asks of its connector (``AWSConnector`` is the one implementation)."""

    #: the raw client config dict (keys the checked ``config`` does not hold: worker guard,
    #: ``max_payload_bytes``, ``htcgrid_redis_control_url``)
    client_config: dict[str, Any]
    #: the checked config (None before ``init``)
    config: ClientConfig | None
    #: the grid secret pickles are signed with (None: raw tasks only)
    payload_signing_key: str | None
    #: False once the grid showed it lacks this package's extensions (cancel of single tasks)
    extensions: bool | None

    @property
    def store(self) -> TaskStore: ...

    def new_listener_id(self) -> str: ...

    def send(self, tasks_list: list[Any], *, session_id: str | None = None, listener: str | None = None,
             options: TaskOptions | None = None) -> dict[str, Any]: ...

    def poll_listener(self, listener: str, sessions: list[dict[str, Any]], after: str | None,
                      wait_sec: float = 0) -> ResultBatch: ...

    def poll_session(self, session_id: str, after: str | None = None, wait_sec: float = 0) -> ResultBatch: ...

    def cancel_tasks(self, task_ids: list[str]) -> dict[str, int]: ...

    def cancel_tasks_unless_started(self, task_ids: list[str]) -> tuple[set[str], set[str]]: ...

    def cancel_sessions(self, session_ids: list[str]) -> dict[str, Any]: ...

    def mark_cancelled_unless_started(self, task_ids: list[str]) -> set[str]: ...

    def delete_session_data(self, *submission_responses: dict[str, Any], guarded: bool = False) -> None: ...

    def keep_task_logs(self, logs: Mapping[str, str]) -> None: ...

    def close(self) -> None: ...
