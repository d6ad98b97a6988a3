"""What tests of every layer share: waiting for a condition, and a grid's fast lease settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["FAST", "wait_for"]

FAST = dict(heartbeat_sec=0.2, lease_sec=1.0)  # a lost worker is noticed within about a second


def wait_for(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
