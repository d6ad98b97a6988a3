"""What differs when the executor talks to a deployed HTC-Grid rather than a grid of this
package: the worker guard sealed into each task, the measured time per call that sizes
``map``'s chunks, and the warnings about what a deployment cannot keep.

A deployment (a config that names no control Redis of this package) cannot cancel single tasks
nor keep time limits, retry counts or at-most-once: our handler does (``worker_guard.py``), told by
a signed guard in each task. ``htcgrid_worker_guard: false`` in the client config turns it off (a
worker without redis-py / boto3).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .options import TaskOptions
from .worker_guard import GUARD_FIELD, guard_location, seal_guard

if TYPE_CHECKING:  # pragma: no cover
    from ._connector_protocol import GridConnector

__all__: list[str] = []  # private module

_CALL_SEC = re.compile(r'"call_sec": ([0-9.e-]+)\}$')
_CHUNK_TARGET_SEC = 1.0  # a deployment's task should last about this long (per-task overhead ~0.5-1 s)
_MAX_AUTO_CHUNK = 1000
_GUARD_LEASE_SEC = 30.0  # the run marker's lease on a deployment (renewed every third of it)


class _DeploymentTraits:
    """The grid's kind, read once from the connector's config; ``call_sec`` is learnt as outputs
    come (written by the poller only, read by ``map`` in callers: a float, swapped whole)."""

    def __init__(self, connector: GridConnector, options: TaskOptions) -> None:
        client_config = connector.client_config or {}
        self.deployment = bool(client_config) and "htcgrid_redis_control_url" not in client_config
        self.guard: dict[str, Any] | None = None
        if self.deployment and client_config.get("htcgrid_worker_guard", True) is not False \
                and connector.config is not None:
            self.guard = guard_location(connector.config)
        if self.deployment:
            warn_once_about_deployment(self.guard is None, options.retry_count)
        self.guard_lease_sec = float(client_config.get("htcgrid_worker_guard_lease_sec", _GUARD_LEASE_SEC))
        self.call_sec: float | None = None  # measured seconds per call (deployment), for map's chunks

    def cancel_unless_started(self, connector: GridConnector) -> Callable[[list[str]], tuple[set[str], set[str]]] | None:
        """How this grid cancels sent tasks that no worker has begun, answering ``(started,
        ended)`` of the others: the local grid's atomic cancel of pending tasks; on a deployment,
        the guard's run markers, created as cancelled unless a worker created them first (exact:
        a begun task counts as started, its end reported later). None without the guard: a
        deployment cannot."""
        if not self.deployment:
            return connector.cancel_tasks_unless_started
        if self.guard is None:
            return None
        mark = connector.mark_cancelled_unless_started
        return lambda task_ids: (mark(task_ids), set())

    def seal(self, tasks: list[dict[str, Any]], task_ids: list[str], raws: list[bool], key: str | None,
             options: TaskOptions) -> None:
        """Put a signed guard in each task of ours: the task id and the limits travel in the task
        (upstream's agent gives the worker the task dict alone, and so each task's guard keeps
        its call's options). No-op without a guard or a key."""
        if self.guard is None or key is None:
            return
        for task, tid, raw in zip(tasks, task_ids, raws, strict=True):
            if not raw:
                task[GUARD_FIELD] = seal_guard(self.guard, tid, key, task_timeout_sec=options.task_timeout_sec,
                                               retry_count=options.retry_count, lease_sec=self.guard_lease_sec)

    def measure(self, output: str) -> None:
        """Learn the seconds per call from the guard's ``call_sec``, the output's last key."""
        if not self.deployment:
            return
        found = _CALL_SEC.search(output, max(0, len(output) - 40))
        if found is not None:
            sample = float(found.group(1))
            self.call_sec = sample if self.call_sec is None else 0.8 * self.call_sec + 0.2 * sample

    def auto_chunksize(self, items: int | None, workers: int | None, options: TaskOptions) -> int:
        """map's chunk size when the user gives none: 1 on a grid of this package. On a
        deployment, whose per-task overhead is of the order of a second, tasks of about
        :data:`_CHUNK_TARGET_SEC` of calls at the time per call the handler measured (so
        ``items`` calls that take less than that in all go as one task); before any measurement,
        two tasks per worker of ``workers`` (default 4). ``items`` None (``buffersize``): chunks of
        the measured target, else 1. ``options``: those of the map (its time limit caps a chunk)."""
        if not self.deployment:
            return 1
        call_sec = self.call_sec
        target = _CHUNK_TARGET_SEC
        timeout = options.task_timeout_sec
        if timeout is not None:
            target = min(target, timeout / 4)  # a chunk is one task: well within its limit
        if items is None:
            return max(1, min(int(target / call_sec), _MAX_AUTO_CHUNK)) if call_sec else 1
        if not call_sec:
            tasks = 2 * (workers or 4)
        else:
            tasks = -(-int(items * call_sec * 1e6) // max(1, int(target * 1e6)))
        tasks = max(1, min(items, tasks))
        return max(1, min(-(-items // tasks), _MAX_AUTO_CHUNK))


_warned: set[str] = set()


def warn_once_about_deployment(no_guard: bool, retry_count: int | None) -> None:
    """What a deployment cannot keep (docs/deploying.md, "What differs"), said once a process."""
    notes = []
    if no_guard:
        notes.append(("no-guard", "htcgrid_worker_guard is off: on this deployment a cancelled call may still "
                      "run, a replayed submission runs calls twice, and task_timeout_sec and retry_count are "
                      "not enforced"))
    if retry_count is not None and retry_count > 5:
        notes.append(("retries", f"retry_count={retry_count}: an HTC-Grid deployment gives up on a lost "
                      "task after 5 retries whatever the client asks"))
    for name, text in notes:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(text, RuntimeWarning, stacklevel=4)
