"""Objects stored once in the data plane for many tasks: :meth:`HTCGridExecutor.share`'s
handles, and the executor's record of what it shared and has not released."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .errors import PayloadError
from .payload import dumps_signed
from .wire import new_session_id, shared_key
from .worker_guard import guard_location
from .worker_scope import SHARED_CONTEXT_PREFIX, shared_object

if TYPE_CHECKING:  # pragma: no cover
    from ._connector_protocol import GridConnector

__all__ = ["SharedHandle"]


class _SharedObjects:
    """The ids of the objects an executor shared and has not released (its own lock)."""

    def __init__(self, connector: GridConnector) -> None:
        self._connector = connector
        self._lock = threading.Lock()
        self._ids: set[str] = set()

    def put(self, obj: Any, key: str, max_payload: int, deployment: bool) -> SharedHandle:
        """Pickle, sign and store ``obj``; its handle. Raises ``PayloadError`` (unpicklable,
        over ``max_payload``) and the data plane's errors."""
        share_id = new_session_id()
        try:
            blob = dumps_signed(obj, key, SHARED_CONTEXT_PREFIX + share_id)
        except PayloadError as exc:
            raise PayloadError(f"cannot pickle the shared object: {exc.__cause__}") from exc.__cause__
        if len(blob) > max_payload:
            raise PayloadError(f"the shared object is too large for the grid: {len(blob):,} bytes in the data "
                               f"plane, over the limit of {max_payload:,} bytes (max_payload_bytes)")
        connector = self._connector
        location = guard_location(connector.config) if deployment else {"store": "GRID"}
        connector.store.put_many({shared_key(share_id): blob.encode()})
        with self._lock:
            self._ids.add(share_id)
        return SharedHandle(self, share_id, location)

    def holds(self, share_id: str) -> bool:
        """True while ``share_id`` is stored and not released."""
        return share_id in self._ids

    def release(self, share_ids: list[str]) -> None:
        """Delete shared objects from the data plane (the caller's thread; raises its errors)."""
        with self._lock:
            ids = [sid for sid in share_ids if sid in self._ids]
            self._ids.difference_update(ids)
        if ids:
            self._connector.store.delete_many([shared_key(sid) for sid in ids])

    def release_all(self) -> None:
        """Release every object still shared (the executor's work is done)."""
        if self._ids:
            self.release(list(self._ids))


class SharedHandle:
    """An object stored once in the grid's data plane by :meth:`HTCGridExecutor.share`.

    In a task (an argument, or a global or closure of its function) it unpickles to the shared
    object, loaded once per worker process. ``release()`` deletes it from the data plane (also
    on leaving ``with handle:``); repeatable. A released handle can no longer be sent
    (``PayloadError`` at ``submit``/``map``).
    """

    __slots__ = ("share_id", "_location", "_shares", "_released", "__weakref__")

    def __init__(self, shares: _SharedObjects, share_id: str, location: dict[str, Any]) -> None:
        self.share_id = share_id
        self._location = location
        self._shares = shares
        self._released = False

    def __reduce__(self) -> tuple[Any, tuple[str, dict[str, Any]]]:
        if self._released:
            raise ValueError(f"shared object {self.share_id} was released")
        return shared_object, (self.share_id, self._location)

    @property
    def released(self) -> bool:
        """True once the object was deleted from the data plane (release, or shutdown)."""
        return self._released or not self._shares.holds(self.share_id)

    def release(self) -> None:
        """Delete the object from the data plane now. Raises the data plane's errors."""
        if self._released:
            return
        self._released = True
        self._shares.release([self.share_id])

    def __enter__(self) -> SharedHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<SharedHandle {self.share_id}{' (released)' if self.released else ''}>"
