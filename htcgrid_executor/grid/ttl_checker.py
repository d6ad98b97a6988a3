"""The TTL checker: gives tasks whose worker stopped heart-beating to another worker.

A task whose lease expired (its agent was killed, its machine is gone, or it hung so hard its
watcher thread stopped) goes back to pending with one more retry, or to failed with a reason once
the retry limit is reached (the state table's ``lose`` step). Unlike the public grid's checker, it
imports and it runs: one thread in the process that owns the grid.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from .redis_refusals import redis_refusal
from .state_table import StateTable

__all__ = ["TTLChecker"]

logger = logging.getLogger(__name__)


class TTLChecker:
    """A thread that sweeps expired leases every ``period_sec`` until :meth:`stop`.

    ``lease_sec``: the agents' lease. A sweep that comes more than ``period_sec + lease_sec / 2``
    after the one before (in Redis's clock) means that Redis or this process stood still, so
    the agents could not heart-beat either: that sweep takes no lease and gives every lease
    that ran out ``lease_sec`` more. ``after_sweep``: called after each successful sweep (the
    control plane trims the listener streams its clients have read).
    """

    def __init__(self, table: StateTable, period_sec: float = 1.0, *, lease_sec: float | None = None,
                 after_sweep: Callable[[], None] | None = None) -> None:
        self.table = table
        self.period_sec = period_sec
        self.lease_sec = lease_sec
        self._after_sweep = after_sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="htcgrid-ttl-checker", daemon=True)
        self.stalls = 0  # sweeps that found a stall and granted leases instead of expiring them

    def start(self) -> TTLChecker:
        self._thread.start()
        return self

    def check_now(self) -> int:
        """One sweep; returns how many expired tasks were retried or failed."""
        stall_ms = grace_ms = 0
        if self.lease_sec:
            stall_ms = int((self.period_sec + self.lease_sec / 2) * 1000)
            grace_ms = int(self.lease_sec * 1000)
        total = 0
        while True:  # a sweep takes at most 1000 at a time, so Redis is never blocked long
            handled = self.table.expire_due(stall_ms=stall_ms, grace_ms=grace_ms)
            if handled < 0:
                self.stalls += 1
                logger.warning("ttl checker: no sweep for over %.1f s (Redis or this process was "
                               "paused): every lease gets %.1f s more", stall_ms / 1000, grace_ms / 1000)
                return total
            total += handled
            stall_ms = 0
            if handled < 1000:
                return total

    def _loop(self) -> None:
        refused = False
        while True:  # a first sweep at once: it is what later sweeps measure a stall from
            try:
                handled = self.check_now()
                if refused:
                    logger.warning("ttl checker: redis takes writes again")
                    refused = False
                if handled:
                    logger.info("ttl checker: %d tasks lost their worker", handled)
                if self._after_sweep is not None:
                    self._after_sweep()
            except redis.exceptions.RedisError as exc:
                refusal = redis_refusal(exc)
                if refusal is None:
                    logger.warning("ttl checker: redis unreachable: %s", exc)
                elif not refused:  # once, not every sweep
                    logger.warning("ttl checker: %s", refusal[1])
                    refused = refusal[0] == 507
            if self._stop.wait(self.period_sec):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
