"""How an executor's two threads start and end: the interpreter-exit hook, joining, and what the
executor owns that the sender releases after the last work (shared objects, connector, grid).

As ``concurrent.futures.process``: at interpreter exit (before non-daemon threads are joined) a
flag is set and the threads finish what was submitted, then stop. The hook is registered once an
executor exists, never at import time: importing the library must not change how the
interpreter exits.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .backoff import spend_until

__all__: list[str] = []  # private module

logger = logging.getLogger(__name__)

IDLE_TICK = 0.5  # how often an idle thread checks whether its executor was collected

_global_shutdown = False
_live: dict[Any, tuple[threading.Thread, ...]] = {}  # call table -> its threads, while they run
_live_lock = threading.Lock()
_atexit_registered = False


class _Stoppable(Protocol):
    def request_stop(self, *, cancel_futures: bool, kill_running: bool) -> None: ...
    def wake(self) -> None: ...


def interpreter_exiting() -> bool:
    """True once the interpreter began to exit: no new work is accepted."""
    return _global_shutdown


def closing(flags: Any, owner: Callable[[], object]) -> bool:
    """True once no new work can come: shutdown (``flags``), interpreter exit, or the executor
    (``owner``, a weak reference) collected. The threads then finish what is left and stop."""
    return flags.shutdown or _global_shutdown or owner() is None


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True
    with _live_lock:
        live = list(_live.items())
    # the program ends on Ctrl-C (an unhandled KeyboardInterrupt): stop the work instead of
    # finishing it, as a process pool's workers, which got the SIGINT too, stop
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    interrupted = isinstance(last, KeyboardInterrupt)
    for table, _ in live:
        if interrupted:
            table.request_stop(cancel_futures=True, kill_running=True)
        table.wake()
    for _, threads in live:
        join(threads)


def _register_atexit() -> None:
    global _atexit_registered
    with _live_lock:
        if _atexit_registered:
            return
        _atexit_registered = True
    try:
        threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
    except RuntimeError:  # interpreter already shutting down
        pass


def start(table: _Stoppable, threads: tuple[threading.Thread, ...]) -> None:
    """Start ``threads`` and have the interpreter's exit finish (or, on Ctrl-C, stop) their work."""
    _register_atexit()
    with _live_lock:
        _live[table] = threads
    for thread in threads:
        thread.start()


def forget(table: _Stoppable) -> None:
    """The threads of ``table`` are ending: the exit hook no longer waits for them."""
    with _live_lock:
        _live.pop(table, None)


def join(threads: tuple[threading.Thread, ...], timeout: float | None = None) -> None:
    """Wait for ``threads``; a no-op when called from one of them (a done callback runs in the
    poller and may call ``shutdown()``: waiting there could never end)."""
    if threading.current_thread() in threads:
        return
    for thread in threads:
        if thread.ident is not None:
            thread.join(timeout)


class _Owned:
    """What an executor owns beyond its threads, released by the sender once all work is done:
    the shared objects left (``_shares``), the connector when the executor made it, and an
    embedded grid. The executor is the composition root that built these; the sender releases
    them because it is the last to need the grid."""

    def __init__(self, shares: Any, connector: Any, owns_connector: bool, grid: Any,
                 budget_sec: float | None, release_grid: Callable[[Any], None]) -> None:
        self.shares = shares
        self.connector = connector if owns_connector else None
        self.grid = grid  # an embedded LocalGrid, or None
        self.release_grid = release_grid  # keeps an embedded grid for the next executor, or stops it
        self.budget_sec = budget_sec  # the executor's broken_after_sec: what deleting the shares may take

    def release(self) -> None:
        """Release everything, logging (never raising) failures: it runs at a thread's end."""
        try:
            # a grid that went away: the deletions give up with the executor's deadline
            with spend_until(None if self.budget_sec is None else time.monotonic() + self.budget_sec):
                self.shares.release_all()
        except Exception as exc:  # noqa: BLE001 - closing must not raise in a thread
            logger.debug("shared objects not deleted: %s", exc)
        if self.connector is not None:
            try:
                self.connector.close()
            except Exception as exc:  # noqa: BLE001 - closing must not raise in a thread
                logger.debug("connector close failed: %s", exc)
        if self.grid is not None:
            grid, self.grid = self.grid, None
            try:
                self.release_grid(grid)
            except Exception as exc:  # noqa: BLE001
                logger.debug("embedded grid not released: %s", exc)
