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
- ``agents``: the same counts in the grid's agent processes, when the harness could load its
  counting hook there (``benchmarks/_hooks/sitecustomize.py``, on the agents' inherited
  ``PYTHONPATH``; they share memory-mapped counter files with the benchmark child);
- ``grid_http_requests_served``: ``LocalGrid.requests_served``, when the grid exposes it;
- ``redis_commands`` / ``redis_commandstats``: commands processed by the grid's Redis as a whole
  (client, HTTP routes, agents), from ``INFO``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

__all__ = [
    "ProcessCounters", "GridRedisCounters", "find_attr_of_type", "connector_counters",
    "install_process_counters", "read_shared_counters", "COUNT_DIR_ENV",
]


#: threads of the client process that belong to the local grid, not to the executor/connector
_GRID_THREAD_HINTS = ("process_request_thread", "htcgrid-http", "htcgrid-ttl", "htcgrid-supervisor")

#: environment variable naming the folder of shared counter files (see ``_hooks/sitecustomize.py``)
COUNT_DIR_ENV = "BENCH_COUNT_DIR"

_SLOTS = ("http_requests", "redis_round_trips", "grid_redis_round_trips")
_SLOT_FORMAT = "<" + "q" * len(_SLOTS)


def _is_grid_thread(name: str) -> bool:
    return any(hint in name for hint in _GRID_THREAD_HINTS)


class ProcessCounters:
    """Counts HTTP requests and Redis round trips made by this process, once installed.

    With ``shared_dir`` the counts live in ``<shared_dir>/<pid>.cnt`` (memory-mapped, updated in
    place on every call), with the process's command line in ``<pid>.cmd``, so that another process
    (the benchmark child) can read the counts of the grid's agents at any moment.
    """

    def __init__(self, shared_dir: str | None = None) -> None:
        self._lock = threading.Lock()
        self._values = [0] * len(_SLOTS)
        self.routes: dict[str, int] = {}  # "<route>_requests" / "<route>_bytes" (answer bodies)
        self._mmap = None
        self.installed: list[str] = []
        if shared_dir:
            import mmap
            import struct

            base = os.path.join(shared_dir, str(os.getpid()))
            try:
                with open("/proc/self/cmdline", "rb") as handle:
                    cmd = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = " ".join(sys.argv)
            with open(base + ".cmd", "w") as handle:
                handle.write(cmd)
            fd = os.open(base + ".cnt", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, b"\0" * struct.calcsize(_SLOT_FORMAT))
            self._mmap = mmap.mmap(fd, struct.calcsize(_SLOT_FORMAT))
            os.close(fd)

    def _add(self, slot: int) -> None:
        with self._lock:
            self._values[slot] += 1
            if self._mmap is not None:
                import struct

                struct.pack_into(_SLOT_FORMAT, self._mmap, 0, *self._values)

    def install(self) -> ProcessCounters:
        import http.client

        counters = self
        original_putrequest = http.client.HTTPConnection.putrequest

        def putrequest(conn, method, url, *args, **kwargs):
            counters._add(0)
            route = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "root"
            conn._bench_route = route
            with counters._lock:
                counters.routes[f"{route}_requests"] = counters.routes.get(f"{route}_requests", 0) + 1
            return original_putrequest(conn, method, url, *args, **kwargs)

        original_getresponse = http.client.HTTPConnection.getresponse

        def getresponse(conn, *args, **kwargs):
            response = original_getresponse(conn, *args, **kwargs)
            route = getattr(conn, "_bench_route", None)
            if route is not None and response.length:  # Content-Length; None when chunked
                with counters._lock:
                    key = f"{route}_bytes"
                    counters.routes[key] = counters.routes.get(key, 0) + response.length
            return response

        http.client.HTTPConnection.putrequest = putrequest
        http.client.HTTPConnection.getresponse = getresponse
        self.installed.append("http.client.HTTPConnection.putrequest/getresponse")
        try:
            import redis.connection as rc
        except ImportError:
            return self
        cls = getattr(rc, "AbstractConnection", None) or rc.Connection
        original_send = cls.send_packed_command

        def send_packed_command(conn, *args, **kwargs):
            counters._add(2 if _is_grid_thread(threading.current_thread().name) else 1)
            return original_send(conn, *args, **kwargs)

        cls.send_packed_command = send_packed_command
        self.installed.append(f"redis.connection.{cls.__name__}.send_packed_command")
        return self

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            http_requests, redis_round_trips, grid_redis = self._values
            routes = dict(self.routes)
        return {
            "client_http_requests": http_requests,
            "client_redis_round_trips": redis_round_trips,
            "grid_inprocess_redis_round_trips": grid_redis,
            "http_routes": routes,
        }


_installed: ProcessCounters | None = None


def install_process_counters(shared_dir: str | None = None) -> ProcessCounters:
    """Install the counters in this process once (idempotent); return them."""
    global _installed
    if _installed is None:
        _installed = ProcessCounters(shared_dir).install()
    return _installed


def read_shared_counters(shared_dir: str, exclude_pid: int | None = None) -> dict[str, dict[str, int]]:
    """Counts of every other process that installed shared counters, summed by role."""
    import struct

    totals: dict[str, dict[str, int]] = {}
    size = struct.calcsize(_SLOT_FORMAT)
    for name in os.listdir(shared_dir):
        if not name.endswith(".cnt") or name == f"{exclude_pid}.cnt":
            continue
        base = os.path.join(shared_dir, name[:-4])
        try:
            with open(base + ".cnt", "rb") as handle:
                values = struct.unpack(_SLOT_FORMAT, handle.read(size))
            with open(base + ".cmd") as handle:
                cmd = handle.read()
        except (OSError, struct.error):
            continue
        role = "agents" if "grid.agent" in cmd else (
            "runners" if "multiprocessing" in cmd else "other processes")
        entry = totals.setdefault(role, {"processes": 0, "http_requests": 0, "redis_round_trips": 0})
        entry["processes"] += 1
        entry["http_requests"] += values[0]
        entry["redis_round_trips"] += values[1] + values[2]
    return totals


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
