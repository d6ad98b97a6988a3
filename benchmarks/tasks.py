"""The work every executor runs: module-level functions, importable by reference in any worker.

They live in their own tiny module (no third-party imports) so that pickling them by reference
is cheap and every peer's worker can import them from the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import time

__all__ = ["noop", "sleep_10ms", "wait_for_file"]


def noop(x=None):
    """Return ``x``: a task whose cost is only the executor's overhead."""
    return x


def sleep_10ms(x=None):
    """Sleep 10 ms (``time.sleep``, not a busy loop) and return ``x``.

    Sleeping rather than spinning means the ideal wall time ``n * 10 ms / workers`` is reachable
    even on a machine where the client and the grid share the workers' cores: what is lost is
    the executor's overhead, not CPU contention with the workload.
    """
    time.sleep(0.01)
    return x


def wait_for_file(path, limit_s=120.0):
    """Block until ``path`` exists (or ``limit_s`` passed): a gate that keeps a worker busy.

    Used to hold every worker while the client accumulates outstanding futures.
    """
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return path
