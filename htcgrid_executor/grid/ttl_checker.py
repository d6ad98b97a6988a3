"""The TTL checker: gives tasks whose worker stopped heart-beating to another worker.

A task whose lease expired (its agent was killed, its machine is gone, or it hung so hard its
watcher thread stopped) goes back to pending with one more retry, or to failed with a reason once
the retry limit is reached (the state table's ``lose`` step). Unlike the public grid's checker, it
imports and it runs: one thread in the process that owns the grid.
"""

from __future__ import annotations

import logging
import threading

import redis

from .state_table import StateTable

__all__ = ["TTLChecker"]

logger = logging.getLogger(__name__)


class TTLChecker:
    """A thread that sweeps expired leases every ``period_sec`` until :meth:`stop`."""

    def __init__(self, table: StateTable, period_sec: float = 1.0) -> None:
        self.table = table
        self.period_sec = period_sec
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="htcgrid-ttl-checker", daemon=True)

    def start(self) -> TTLChecker:
        self._thread.start()
        return self

    def check_now(self) -> int:
        """One sweep; returns how many expired tasks were retried or failed."""
        total = 0
        while True:  # a sweep takes at most 1000 at a time, so Redis is never blocked long
            handled = self.table.expire_due()
            total += handled
            if handled < 1000:
                return total

    def _loop(self) -> None:
        while not self._stop.wait(self.period_sec):
            try:
                handled = self.check_now()
                if handled:
                    logger.info("ttl checker: %d tasks lost their worker", handled)
            except redis.exceptions.RedisError as exc:
                logger.warning("ttl checker: redis unreachable: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
