"""Embedded grids kept between executors, so that the next ``HTCGridExecutor()`` starts at once.

An executor with no grid configured starts a :class:`~.local_grid.LocalGrid` of its own: Redis,
the control plane and the agents, each a process (0.5-0.8 s to the first result on a 2-core
machine). When it shuts down, its grid is kept, idle, for ``HTCGRID_KEEP_IDLE_GRID_SEC`` seconds
(default 10; 0 stops it with its executor), and the next executor of this process that asks for
the same grid takes it: create, first result and shutdown then take milliseconds, as a process
pool's do. Only what would make no difference to the calls is shared:

- the same grid: the same ``max_workers``, ``max_tasks_per_child`` and ``max_payload_bytes``;
- the same surroundings the agents were started with: ``os.environ``, ``sys.path`` and the
  working folder (so that variables set, and folders put on the path, between two executors
  are seen, as a new grid would see them);
- fresh runners: a grid handed back has every agent replace its runner with a new process
  (:meth:`~.local_grid.LocalGrid.renew_runners`) while it waits, so that no module state, import
  or child process of one executor's calls reaches the next one's, as with a new pool.

One grid at most is kept. It is stopped when its idle time is up, when an executor needs a
different one, at interpreter exit, or by :func:`stop_idle_grids`; a grid that no longer answers
is stopped instead of being handed out.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:  # pragma: no cover
    from .local_grid import LocalGrid

__all__ = ["KEEP_IDLE_GRID_ENV", "take_grid", "hand_back", "stop_idle_grids"]

logger = logging.getLogger(__name__)

KEEP_IDLE_GRID_ENV = "HTCGRID_KEEP_IDLE_GRID_SEC"
_DEFAULT_KEEP_SEC = 10.0

_lock = threading.Lock()
# the kept grid, its key, its expiry, and the process that kept it (a fork's child must not
# stop its parent's grid)
_idle: tuple[LocalGrid, str, threading.Timer, int] | None = None
# grid -> (its key, how long to keep it) while an executor uses it; weak, so that a grid dropped
# without a hand-back (its connector could not be made) leaves no entry for another to match
_keys: weakref.WeakKeyDictionary[LocalGrid, tuple[str, float]] = weakref.WeakKeyDictionary()
_exiting = False
_expiring = threading.Lock()  # held while an idle grid's time ran out and it stops
_atexit_registered = False


def keep_idle_sec() -> float:
    """``HTCGRID_KEEP_IDLE_GRID_SEC`` as read now; raises ConfigurationError naming a bad value."""
    text = os.environ.get(KEEP_IDLE_GRID_ENV, "").strip()
    if not text:
        return _DEFAULT_KEEP_SEC
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigurationError(f"{KEEP_IDLE_GRID_ENV}={text!r}: expected a number of seconds >= 0 "
                                 f"(0 stops an executor's embedded grid with it)")
    return seconds


def _key(workers: int | None, max_tasks_per_child: int | None, max_payload_bytes: int) -> str:
    """What a kept grid must match: its settings and what its agents were started with."""
    surroundings = repr((os.getpid(), workers, max_tasks_per_child, max_payload_bytes, os.getcwd(),
                         sorted(os.environ.items()), sys.path))
    return hashlib.sha256(surroundings.encode(errors="surrogateescape")).hexdigest()


def take_grid(workers: int | None, max_tasks_per_child: int | None, max_payload_bytes: int) -> LocalGrid:
    """A running embedded grid for a new executor: the kept one if it matches and answers, else
    a new one (the kept one, if any, is stopped). Raises ConfigurationError for a bad
    ``HTCGRID_KEEP_IDLE_GRID_SEC``, GridUnavailableError if a new grid cannot start."""
    global _idle
    keep_sec = keep_idle_sec()
    key = _key(workers, max_tasks_per_child, max_payload_bytes)
    with _lock:
        idle, _idle = _idle, None
    if idle is not None and idle[3] == os.getpid():
        grid, idle_key, timer, _ = idle
        timer.cancel()
        if idle_key == key and _answers(grid):
            with _lock:
                _keys[grid] = (key, keep_sec)
            logger.debug("embedded grid at %s taken again", grid.url)
            return grid
        grid.stop()
    from .local_grid import LocalGrid

    grid = LocalGrid(workers=workers, max_tasks_per_child=max_tasks_per_child,
                     max_payload_bytes=max_payload_bytes)
    grid.start()
    with _lock:
        _keys[grid] = (key, keep_sec)
    return grid


def hand_back(grid: LocalGrid) -> None:
    """An executor is done with ``grid`` (all its work ended): keep it for the next one, with
    renewed runners, or stop it (keeping is off, the interpreter is exiting, or it fails)."""
    global _idle, _atexit_registered
    with _lock:
        key, keep_sec = _keys.pop(grid, ("", 0.0))
        keep = keep_sec > 0 and not _exiting and bool(key)
        if keep and not _atexit_registered:
            # registered after the grids' own exit handler, so it runs first (atexit is LIFO)
            atexit.register(_at_exit)
            _atexit_registered = True
    if keep:
        try:
            grid.renew_runners()
        except Exception as exc:  # noqa: BLE001 - a grid that cannot renew is not kept
            logger.debug("embedded grid not kept: %s", exc)
            keep = False
    if not keep:
        grid.stop()
        return
    timer = threading.Timer(keep_sec, _expire, args=(grid,))
    timer.name, timer.daemon = "htcgrid-idle-grid", True
    with _lock:
        previous, _idle = _idle, (grid, key, timer, os.getpid())
        exiting = _exiting
        if exiting:  # the exit handler ran meanwhile: it would not see this grid
            _idle = None
    if previous is not None and previous[3] == os.getpid():  # another executor's grid was kept
        previous[2].cancel()
        previous[0].stop()
    if exiting:
        grid.stop()
        return
    timer.start()  # (a take_grid that came first cancelled it: it then ends at once)


def _expire(grid: LocalGrid) -> None:
    global _idle
    with _expiring:
        with _lock:
            if _idle is None or _idle[0] is not grid:
                return  # taken again, or replaced, in the meantime
            _idle = None
        logger.debug("embedded grid at %s idle too long: stopping it", grid.url)
        grid.stop()


def stop_idle_grids() -> None:
    """Stop the embedded grid kept for the next executor, if any, now (it would stop after
    ``HTCGRID_KEEP_IDLE_GRID_SEC`` seconds, or at interpreter exit). Grids in use are not
    touched."""
    global _idle
    with _lock:
        idle, _idle = _idle, None
    if idle is not None and idle[3] == os.getpid():
        idle[2].cancel()
        idle[0].stop()


def _at_exit() -> None:
    global _exiting
    with _lock:
        _exiting = True
    stop_idle_grids()
    # a grid whose idle time ran out just now is stopping in its timer thread, which the exit
    # would cut short (leaving its temporary folder): let it finish
    if _expiring.acquire(timeout=30):
        _expiring.release()


def _answers(grid: LocalGrid) -> bool:
    """Whether a kept grid still runs and its Redis answers (its supervisor revives the rest)."""
    from .local_grid import GridState

    if grid.state is not GridState.RUNNING or grid.redis is None:
        return False
    try:
        return bool(grid.redis.ping())
    except Exception:  # noqa: BLE001 - any failure: a new grid instead
        return False
