"""Helpers the executor tests share: leftover checks and the session grid's handle.

A module of its own, not conftest.py: test folders that each ``from conftest import ...``
shadow one another on sys.path in a full run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil

from htcgrid_executor.grid import LocalGrid

# our own threads; the grid's (htcgrid-spawner, -supervisor, ...) belong to the session grid
EXECUTOR_THREADS = ("htcgrid-sender", "htcgrid-poller")
WORKERS = 2


def executor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(EXECUTOR_THREADS)]


def grid_tree(grid: LocalGrid) -> set[int]:
    """Every process of a running grid: Redis, agents and their runners."""
    pids: set[int] = set()
    roots = list(grid.agent_pids())
    if grid.redis_server is not None and grid.redis_server.pid:
        roots.append(grid.redis_server.pid)
    for pid in roots:
        try:
            process = psutil.Process(pid)
            pids.add(pid)
            pids.update(child.pid for child in process.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return pids


def stray_processes(grid: LocalGrid | None, before: set[int] = frozenset()) -> list[psutil.Process]:
    """Live child processes of this test process that belong to no fixture grid (nor ``grid``)
    and were not there ``before`` (other suites' session fixtures may hold processes)."""
    allowed: set[int] = set(before)
    for fixture in {id(g): g for g in [*FIXTURE_GRIDS, *([grid] if grid else [])]}.values():
        allowed |= grid_tree(fixture)
    strays = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in allowed or child.status() == psutil.STATUS_ZOMBIE:
                continue
            # multiprocessing's resource tracker (agents start one for their spawned runners)
            # leaves with its parent; once, in one run of six, one was seen outside every grid
            # tree (cause not found). The executor itself starts no process.
            if "multiprocessing.resource_tracker" in " ".join(child.cmdline()):
                continue
            strays.append(child)
        except psutil.NoSuchProcess:
            continue
    return strays


def assert_no_executor_threads(timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and executor_threads():
        time.sleep(0.05)
    assert executor_threads() == [], f"executor threads left: {executor_threads()}"


def child_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def assert_nothing_left(grid: LocalGrid | None, timeout: float = 15.0, before: set[int] = frozenset()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (executor_threads() or stray_processes(grid, before)):
        time.sleep(0.05)
    assert executor_threads() == [], f"executor threads left: {executor_threads()}"
    strays = stray_processes(grid, before)
    assert strays == [], f"processes left: {[(p.pid, p.cmdline()) for p in strays]}"


_session_grid: list[LocalGrid] = []
FIXTURE_GRIDS: list[LocalGrid] = []  # grids that outlive a test (module and session fixtures)


@contextlib.contextmanager
def fixture_grid(**kwargs: Any) -> Iterator[LocalGrid]:
    """A LocalGrid for a module fixture: its processes are not counted as a test's leftovers."""
    with LocalGrid(**kwargs) as local_grid:
        FIXTURE_GRIDS.append(local_grid)
        try:
            yield local_grid
        finally:
            FIXTURE_GRIDS.remove(local_grid)


def running_grid() -> LocalGrid | None:
    return _session_grid[0] if _session_grid else None
