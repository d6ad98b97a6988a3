"""What a connector sent and received: its data plane wrapped to count batched calls and bytes
(:class:`CountedStore`), and the snapshot :meth:`AWSConnector.stats` returns
(:func:`stats_snapshot`), put together from the transport's and the store's counts."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .dataplane import DataPlane

__all__ = ["CountedStore", "stats_snapshot"]


class CountedStore(DataPlane):
    """The connector's data plane, counting its batched calls and the value bytes they move
    (one lock per batch, not per key), for :meth:`AWSConnector.stats`."""

    def __init__(self, store: DataPlane) -> None:
        self.inner = store
        self._lock = threading.Lock()
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return repr(self.inner)

    def put_many(self, items: Mapping[str, bytes], *, expire_sec: float | None = None) -> None:
        size = sum(len(value) for value in items.values())
        with self._lock:
            self.calls += 1
            self.bytes_sent += size
        self.inner.put_many(items, expire_sec=expire_sec)

    def create_many(self, items: Mapping[str, bytes]) -> set[str]:
        size = sum(len(value) for value in items.values())
        with self._lock:
            self.calls += 1
            self.bytes_sent += size
        return self.inner.create_many(items)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            self.calls += 1
        values = self.inner.get_many(keys)
        size = sum(len(value) for value in values if value is not None)
        with self._lock:
            self.bytes_received += size
        return values

    def delete_many(self, keys: Iterable[str]) -> None:
        with self._lock:
            self.calls += 1
        self.inner.delete_many(keys)

    def close(self) -> None:
        self.inner.close()

    def counts(self) -> tuple[int, int, int]:
        """(calls, bytes sent, bytes received), read together under the lock."""
        with self._lock:
            return self.calls, self.bytes_sent, self.bytes_received


def stats_snapshot(http: dict[str, Any], store: CountedStore, polls: int, long_polls: int) -> dict[str, Any]:
    """The :meth:`AWSConnector.stats` dict from the transport's ``counters()``, the counted
    store, and the connector's poll counts."""
    calls, sent, received = store.counts()
    return {
        "http_requests": sum(http["requests"].values()),
        "http_requests_by_route": http["requests"],
        "round_trips": http["round_trips"] + calls,
        "http_round_trips": http["round_trips"],
        "retries": http["retries"],
        "bytes_sent": http["bytes_sent"],
        "bytes_received": http["bytes_received"],
        "polls": polls,
        "long_polls": long_polls,
        "dataplane_calls": calls,
        "dataplane_bytes_sent": sent,
        "dataplane_bytes_received": received,
    }
