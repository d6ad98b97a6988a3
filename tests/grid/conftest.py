"""Fixtures for the local grid's tests: real Redis, real HTTP, real agent processes.

These tests speak HTTP and Redis directly (as a deployment's clients do) so that they test the
grid alone; the connector's own tests run it against the same grid.
"""

from __future__ import annotations

import pytest
from grid_client import FAST, GridClient

from htcgrid_executor.grid import LocalGrid


@pytest.fixture(scope="module")
def grid():
    with LocalGrid(workers=2, handler="grid_handlers:act", **FAST) as g:
        yield g


@pytest.fixture
def client(grid):
    return GridClient(grid)
