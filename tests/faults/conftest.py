"""Fixtures of the fault tests: every test runs the real local grid (Redis, HTTP, agent
processes); faults are real SIGKILLs, restarts and tampered Redis keys, never mocks."""

from __future__ import annotations

import json
import os

import pytest
from fault_helpers import FIGURE_LABELS, FIGURES
from support import FAST

from htcgrid_executor import HTCGridExecutor
from htcgrid_executor.connector import AWSConnector
from htcgrid_executor.grid import LocalGrid


@pytest.fixture
def figures():
    """The run's figures (see docs/reliability.md): tests add what they did and saw."""
    return FIGURES


@pytest.fixture
def make_grid():
    """``make_grid(**options)``: a started LocalGrid (fast heartbeats unless told otherwise),
    stopped after the test."""
    grids: list[LocalGrid] = []

    def make(**options) -> LocalGrid:
        grid = LocalGrid(**{**FAST, **options})
        grids.append(grid)
        return grid.start()

    yield make
    for grid in grids:
        grid.stop()


@pytest.fixture
def make_executor(make_grid):
    """``make_executor(grid, **options)``: an executor on that grid, shut down (pending work
    cancelled, running work killed) after the test and before its grid stops."""
    made: list[HTCGridExecutor] = []

    def make(grid: LocalGrid, **options) -> HTCGridExecutor:
        options.setdefault("broken_after_sec", 30)
        executor = HTCGridExecutor(config=grid.client_config, **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True, kill_running=True)


@pytest.fixture
def make_connector(make_grid):
    """``make_connector(grid)``: an AWSConnector on that grid, closed after the test."""
    made: list[AWSConnector] = []

    def make(grid: LocalGrid, **overrides) -> AWSConnector:
        connector = AWSConnector({**grid.client_config, **overrides})
        made.append(connector)
        return connector

    yield make
    for connector in made:
        connector.close()


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault-test figures (docs/reliability.md)")
    for key, label in FIGURE_LABELS.items():
        if key in FIGURES or key in ("results_lost", "duplicate_resolutions"):
            terminalreporter.write_line(f"{FIGURES.get(key, 0):>10,}  {label}")
    path = os.environ.get("HTCGRID_FAULT_FIGURES")
    if path:
        with open(path, "w") as handle:
            json.dump(dict(FIGURES), handle, indent=2, sort_keys=True)
