"""Counting control-plane calls of ``HTCGridExecutor`` from outside the library.

Three sources, each optional, all read as snapshots whose differences a section reports:

- ``connector``: counters the connector exposes itself, if it does (preferred, exact per layer);
- ``client_http_requests`` / ``client_redis_round_trips``: HTTP requests started and Redis
  commands or pipelines sent by the client process, counted by wrapping
  ``http.client.HTTPConnection.putrequest`` and redis-py's ``send_packed_command``. A pipeline is
  one round trip. The local grid's HTTP routes and TTL checker run as threads of the client
  process: their Redis round trips are counted apart (``grid_inprocess_redis_round_trips``), told
  by the thread that sends them (HTTP handler threads, ``htcgrid-*`` threads other than the
  executor's own);
- ``grid_http_requests_served``: ``LocalGrid.requests_served``, when the grid exposes it;
- ``redis_commands`` / ``redis_commandstats``: commands processed by the grid's Redis as a whole
  (client, HTTP routes, agents), from ``INFO``.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["ProcessCounters", "GridRedisCounters", "find_attr_of_type", "connector_counters"]


#: threads of the client process that belong to the local grid, not to the executor/connector
_GRID_THREAD_HINTS = ("process_request_thread", "htcgrid-http", "htcgrid-ttl", "htcgrid-supervisor")


def _is_grid_thread(name: str) -> bool:
    return any(hint in name for hint in _GRID_THREAD_HINTS)


class ProcessCounters:
    """Counts HTTP requests and Redis round trips made by this process, once installed."""

    def __init__(self) -> None:
        self.http_requests = 0
        self.redis_round_trips = 0
        self.grid_redis_round_trips = 0
        self._lock = threading.Lock()
        self.installed: list[str] = []

    def install(self) -> ProcessCounters:
        import http.client

        counters = self
        original_putrequest = http.client.HTTPConnection.putrequest

        def putrequest(conn, *args, **kwargs):
            with counters._lock:
                counters.http_requests += 1
            return original_putrequest(conn, *args, **kwargs)

        http.client.HTTPConnection.putrequest = putrequest
        self.installed.append("http.client.HTTPConnection.putrequest")
        try:
            import redis.connection as rc
        except ImportError:
            return self
        cls = getattr(rc, "AbstractConnection", None) or rc.Connection
        original_send = cls.send_packed_command

        def send_packed_command(conn, *args, **kwargs):
            grid = _is_grid_thread(threading.current_thread().name)
            with counters._lock:
                if grid:
                    counters.grid_redis_round_trips += 1
                else:
                    counters.redis_round_trips += 1
            return original_send(conn, *args, **kwargs)

        cls.send_packed_command = send_packed_command
        self.installed.append(f"redis.connection.{cls.__name__}.send_packed_command")
        return self

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "client_http_requests": self.http_requests,
                "client_redis_round_trips": self.redis_round_trips,
                "grid_inprocess_redis_round_trips": self.grid_redis_round_trips,
            }


class GridRedisCounters:
    """Commands processed by the grid's Redis (all of its clients), from ``INFO``."""

    def __init__(self, redis_url: str, password: str | None = None) -> None:
        import redis

        self._redis = redis.Redis.from_url(redis_url, password=password or None)
        self._redis.ping()

    def snapshot(self) -> dict[str, Any]:
        # Our own INFO calls are counted by Redis too: two per snapshot, negligible against
        # thousands of tasks, and subtracted below anyway.
        stats = self._redis.info("stats")
        commandstats = self._redis.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in commandstats.items()}
        calls["info"] = calls.get("info", 0) - 2
        return {
            "redis_commands": int(stats["total_commands_processed"]) - 2,
            "redis_commandstats": calls,
        }


def find_attr_of_type(obj: Any, type_names: tuple[str, ...], depth: int = 2) -> Any:
    """The first attribute (searched ``depth`` levels deep) whose class name is in ``type_names``.

    Lets the harness find the executor's connector and local grid without depending on private
    attribute names that are still moving.
    """
    seen: set[int] = set()
    frontier = [obj]
    for _ in range(depth):
        next_frontier = []
        for item in frontier:
            for value in list(getattr(item, "__dict__", {}).values()):
                if id(value) in seen:
                    continue
                seen.add(id(value))
                if type(value).__name__ in type_names:
                    return value
                if hasattr(value, "__dict__") and not isinstance(value, type):
                    next_frontier.append(value)
        frontier = next_frontier
    return None


def connector_counters(connector: Any) -> dict[str, Any] | None:
    """Counters the connector exposes (``stats``/``counters``, attribute or method), if any."""
    for name in ("stats", "counters", "call_counts", "metrics"):
        value = getattr(connector, name, None)
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if isinstance(v, int | float)}
    return None
