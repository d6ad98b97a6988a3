"""Fixtures of the executor tests: one real local grid for the session, executors on it, and
teardown checks that nothing (thread, process) is left behind."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from executor_support import (
    WORKERS,
    _session_grid,
    assert_nothing_left,
    child_pids,
    fixture_grid,
    running_grid,
)
from stdlib_reference import ReferenceProcessPoolExecutor

from htcgrid_executor.executor import HTCGridExecutor
from htcgrid_executor.grid import LocalGrid
from htcgrid_executor.grid.idle_grids import stop_idle_grids


@pytest.fixture(scope="session")
def grid() -> Iterator[LocalGrid]:
    """One local grid for the whole session: 2 agents; a lost task is retried twice; agents claim
    one task at a time, so that a task the grid reports processing is the one its agent runs (as
    a process pool's running futures are), which the cancellation tests rely on."""
    before = child_pids()
    with fixture_grid(workers=WORKERS, retry_limit=2, claim_batch=1) as local_grid:
        _session_grid.append(local_grid)
        yield local_grid
        _session_grid.clear()
    assert_nothing_left(None, timeout=10, before=before)
    assert [t for t in threading.enumerate() if t.name.startswith("htcgrid-") and t.name != "htcgrid-spawner"] == []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Every test ends with no executor thread and no child process beyond the session grid's."""
    before = child_pids()
    yield
    # an embedded grid kept for the next executor is meant to outlive its executor (its own
    # tests, in test_executor_kept_grid.py, check how long); leaks are what is counted here
    stop_idle_grids()
    assert_nothing_left(running_grid(), before=before)


@pytest.fixture(params=["process", "htcgrid"])
def executor_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_executor(executor_kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Build executors of the kind under test (ProcessPoolExecutor with Python 3.14's map, or
    HTCGridExecutor on the session grid); all are shut down at the end of the test."""
    created: list[Any] = []
    config = request.getfixturevalue("grid").client_config if executor_kind == "htcgrid" else None

    def make(**kwargs: Any) -> Any:
        if executor_kind == "process":
            executor = ReferenceProcessPoolExecutor(max_workers=WORKERS, **kwargs)
        else:
            executor = HTCGridExecutor(config=config, **kwargs)
        created.append(executor)
        return executor

    yield make
    for executor in created:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make_executor: Callable[..., Any]) -> Any:
    return make_executor()


@pytest.fixture
def grid_executor(grid: LocalGrid) -> Iterator[HTCGridExecutor]:
    with HTCGridExecutor(config=grid.client_config) as executor:
        yield executor
