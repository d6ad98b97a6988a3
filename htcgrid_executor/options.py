"""``TaskOptions``: the grid options of a task (priority, time limit, retries), in one value.

One frozen, validated object travels from the executor (its defaults, or a view's
``options(...)``) through the sender to ``AWSConnector.send`` (which writes it into the
submission's ``scheduler_data``/``context``, the wire's per-session fields) and, on a deployment,
into each task's signed guard (``worker_guard.seal_guard``), which enforces the time limit and the
retries per task. Pure Python: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskOptions", "DEFAULT_PRIORITY", "DEFAULT_TASK_TIMEOUT_SEC", "DEFAULT_RETRY_COUNT", "MAX_PRIORITY",
           "KEEP"]

# The defaults of an executor's tasks, spelt here only (HTCGridExecutor's signature reads them).
#: queued tasks of equal priority run in submission order
DEFAULT_PRIORITY = 0
#: None: the grid's own limit (3600 s on HTC-Grid)
DEFAULT_TASK_TIMEOUT_SEC: float | None = None
#: retries of a task whose worker was lost, by default, for an executor's tasks (see HTCGridExecutor)
DEFAULT_RETRY_COUNT = 2
#: the largest ``abs(priority)`` a grid of this package queues (its state table's limit)
MAX_PRIORITY = 1_000_000


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: ``replace()``/``options()``: an option given this value keeps its current one
KEEP: Any = _Keep()


@dataclass(frozen=True)
class TaskOptions:
    """What the grid is told about a task; equal options may share a session.

    ``priority``: an integer within ±:data:`MAX_PRIORITY`; higher runs first among queued tasks.
    ``task_timeout_sec``: a positive number of seconds a task may run (None: the grid's default,
    3600 s on HTC-Grid). ``retry_count``: how often a task whose worker was lost is tried again,
    an integer >= 0 (None: the grid's default, 5). The defaults are an executor's
    (:data:`DEFAULT_RETRY_COUNT` retries). Raises ``TypeError`` for a value of the wrong type and
    ``ValueError`` for one out of range, naming the option.
    """

    priority: int = DEFAULT_PRIORITY
    task_timeout_sec: float | None = DEFAULT_TASK_TIMEOUT_SEC
    retry_count: int | None = DEFAULT_RETRY_COUNT

    def __post_init__(self) -> None:
        priority, timeout, retries = self.priority, self.task_timeout_sec, self.retry_count
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an integer, got {priority!r}")
        if abs(priority) > MAX_PRIORITY:
            raise ValueError(f"priority must be within ±{MAX_PRIORITY:,}, got {priority}")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"task_timeout_sec must be a number of seconds or None, got {timeout!r}")
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(f"task_timeout_sec must be a positive, finite number of seconds, got {timeout!r}")
        if retries is not None:
            if isinstance(retries, bool) or not isinstance(retries, int):
                raise TypeError(f"retry_count must be an integer or None, got {retries!r}")
            if retries < 0:
                raise ValueError(f"retry_count must be >= 0, got {retries}")

    def replace(self, **changes: Any) -> TaskOptions:
        """A copy with ``changes`` (option names as keywords), validated; a value :data:`KEEP`
        keeps this one's; an unknown name raises ``TypeError`` naming it."""
        changes = {name: value for name, value in changes.items() if value is not KEEP}
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown task option(s) {', '.join(unknown)}: the options are {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)
