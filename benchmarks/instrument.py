"""Control-plane counts of ``HTCGridExecutor``, read from the library's own counters.

All read as snapshots whose differences a section reports:

- ``connector``: :meth:`AWSConnector.stats` (HTTP requests per route, round trips, retries, bytes,
  polls and long polls, data-plane calls and bytes), exact, kept by the connector as it goes;
- ``agents``: :meth:`LocalGrid.agent_stats` summed over the agents (tasks claimed, claims,
  runner restarts, heartbeats), as each agent last published them at its heartbeat (so up to a
  second behind: close enough over a section of thousands of tasks);
- ``grid_http_requests_served``: ``LocalGrid.requests_served``;
- ``redis_commands`` / ``redis_commandstats``: commands processed by the grid's Redis as a whole
  (client, HTTP routes, agents), from ``INFO``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GridRedisCounters", "find_attr_of_type", "summed_agent_stats"]


def summed_agent_stats(grid: Any) -> dict[str, int]:
    """:meth:`LocalGrid.agent_stats`, summed over the agents, with ``agents`` (how many)."""
    total: dict[str, int] = {"agents": 0}
    for counters in grid.agent_stats().values():
        total["agents"] += 1
        for key, value in counters.items():
            total[key] = total.get(key, 0) + value
    return total


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
