"""Redis errors that say Redis refuses work rather than that it cannot be reached, and the HTTP
status and message each means for a client (the control plane answers them; the TTL checker
waits them out)."""

from __future__ import annotations

import re

import redis

__all__ = ["redis_refusal"]

# Redis refusals that are not an outage. The reason is the error's first word, after the
# "-" of a command's error inside a script's error; redis-py strips the word of an OOM error.
_REFUSAL = re.compile(r"(?:^|-)(MISCONF|OOM|BUSY|LOADING) ")
_REFUSALS = {
    "MISCONF": (507, "the grid's Redis cannot save its data and refuses writes (MISCONF: is its disk full?)"),
    "OOM": (507, "the grid's Redis is out of memory and refuses writes (OOM: maxmemory reached)"),
    "BUSY": (503, "the grid's Redis is busy running a long script; try again"),
    "LOADING": (503, "the grid's Redis is loading its data after a restart; try again"),
}


def redis_refusal(exc: BaseException) -> tuple[int, str] | None:
    """``(status, message)`` for a Redis error that says Redis refuses work rather than that
    it cannot be reached: 507 when it refuses writes (full memory or disk), 503 when it is busy
    or loading; None for any other error."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        word = "OOM"
    elif isinstance(exc, redis.exceptions.BusyLoadingError):
        word = "LOADING"
    else:
        match = _REFUSAL.search(str(exc))
        if match is None:
            return None
        word = match.group(1)
    status, message = _REFUSALS[word]
    return status, f"{message}: {exc}"
