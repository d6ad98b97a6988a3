"""Fixtures for the local grid's tests: real Redis, real HTTP, real agent processes.

These tests speak HTTP and Redis directly (as a deployment's clients do) so that they test the
grid alone; the connector's own tests run it against the same grid.
"""

from __future__ import annotations

import pytest
from grid_client import GridClient
from support import FAST

from htcgrid_executor.grid import LocalGrid
from htcgrid_executor.grid.redis_server import RedisServer


@pytest.fixture(scope="module")
def grid():
    with LocalGrid(workers=2, handler="handlers:act", **FAST) as g:
        yield g


@pytest.fixture
def client(grid):
    return GridClient(grid)


@pytest.fixture(scope="module")
def redis_client():
    """A redis-server of its own (no grid around it), for the state table's own tests."""
    with RedisServer() as server:
        client = server.client()
        yield client
        client.close()
