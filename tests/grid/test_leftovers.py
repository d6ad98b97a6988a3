"""A grid leaves nothing behind: no process, socket or temporary file, however often it starts."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil

from htcgrid_executor.grid import LocalGrid


def _snapshot():
    me = psutil.Process()
    return (
        {p.pid for p in me.children(recursive=True)},
        len(me.net_connections(kind="inet")) + len(me.net_connections(kind="unix")),
        set(glob.glob(os.path.join(tempfile.gettempdir(), "htcgrid-*"))),
        me.num_fds(),
    )


def test_eight_starts_and_stops_leave_no_process_socket_or_file(tmp_path, monkeypatch):
    # a private temporary folder: other processes on this machine may be making grids too
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before_children, before_sockets, before_files, before_fds = _snapshot()
    for _ in range(8):  # a leak of one fd or file per start shows after the first
        with LocalGrid(workers=1, handler="handlers:echo") as grid:
            assert grid.agent_pids()
    time.sleep(0.2)
    children, sockets, files, fds = _snapshot()
    assert children - before_children == set()
    assert files - before_files == set()
    assert sockets <= before_sockets
    assert fds <= before_fds + 2  # pytest's own captures may open one or two


def test_a_killed_parent_takes_its_whole_grid_with_it():
    script = textwrap.dedent("""
        import sys, time
        from htcgrid_executor.grid import LocalGrid
        grid = LocalGrid(workers=2, handler="handlers:echo").start()
        print(grid.redis_server.pid, grid.control_plane_stats()["pid"], *grid.agent_pids(), flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 4
    time.sleep(0.5)  # let the agents start their runners
    runners = [c.pid for pid in pids[2:] for c in psutil.Process(pid).children()]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in pids + runners):
        time.sleep(0.05)
    alive = [p for p in pids + runners if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == []
