"""Functions the stand-in's agents run (importable there: the agents have this folder on their path)."""

from __future__ import annotations

import os
import time


def record(path: str, value: int) -> int:
    """Append ``value`` to ``path``: how a test counts the runs of a call."""
    with open(path, "a") as handle:
        handle.write(f"{value}\n")
        handle.flush()
        os.fsync(handle.fileno())
    return value


def slow_record(path: str, value: int, sec: float) -> int:
    """Tell ``<path>.begun`` that the call has begun, then sleep ``sec`` and record ``value``."""
    record(path + ".begun", value)
    time.sleep(sec)
    return record(path, value)


def sleep(sec: float) -> float:
    time.sleep(sec)
    return sec


def double(x: int) -> int:
    return 2 * x


def runs(path: str) -> list[int]:
    try:
        with open(path) as handle:
            return [int(line) for line in handle.read().split()]
    except FileNotFoundError:
        return []
