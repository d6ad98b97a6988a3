"""The control plane (HTTP routes, TTL checker) runs in a process of its own, tied to the grid."""

from __future__ import annotations

import os
import signal
import socket
import threading

import psutil
import pytest
import requests
from support import FAST

from htcgrid_executor import GridUnavailableError, HTCGridExecutor
from htcgrid_executor.grid import LocalGrid


def test_the_routes_and_the_ttl_checker_live_in_a_child_not_in_the_users_process(grid):
    stats = grid.control_plane_stats()
    assert stats["pid"] != os.getpid()
    assert stats["pid"] in {child.pid for child in psutil.Process().children()}
    grid_threads = [t.name for t in threading.enumerate() if t.name.startswith(("htcgrid-http", "htcgrid-ttl"))]
    assert grid_threads == []
    # its counters are exact: three requests answered, three more counted
    served = grid.requests_served
    for _ in range(3):
        assert requests.get(grid.url + "/result", params={"submission_content": "x"}, timeout=5).status_code == 401
    assert grid.requests_served == served + 3


@pytest.mark.timeout(90)
def test_a_killed_control_plane_comes_back_on_its_port_and_an_executor_rides_it_out():
    with LocalGrid(workers=1, **FAST) as grid, \
            HTCGridExecutor(config=grid.client_config, broken_after_sec=30) as executor:
        assert executor.submit(pow, 2, 5).result(timeout=30) == 32
        url, killed = grid.url, grid.control_plane_stats()["pid"]
        os.kill(killed, signal.SIGKILL)
        later = [executor.submit(pow, 2, x) for x in range(20)]
        assert [f.result(timeout=40) for f in later] == [2 ** x for x in range(20)]
        stats = grid.control_plane_stats()
        assert stats["pid"] != killed and grid.url == url
        assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE


def test_a_control_plane_that_cannot_listen_fails_the_start_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        grid = LocalGrid(workers=1, port=port)
        with pytest.raises(GridUnavailableError, match=f"control plane did not start on 127.0.0.1:{port}"):
            grid.start()
        left = {child.pid for child in psutil.Process().children(recursive=True)} - before
        assert [p for p in left if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
