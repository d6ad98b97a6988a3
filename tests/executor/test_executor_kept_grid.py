"""The embedded grid an executor starts is kept, idle, for the next executor of the process: a
second ``HTCGridExecutor()`` starts in milliseconds, and its calls still run in fresh runners and
see the environment of their own time, as a new process pool's would."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from executor_tasks import get_initialized, getpid, initializer
from support import wait_for

from htcgrid_executor.errors import ConfigurationError
from htcgrid_executor.executor import HTCGridExecutor
from htcgrid_executor.grid.idle_grids import KEEP_IDLE_GRID_ENV, stop_idle_grids

T = 60


def _gone(pids: list[int]) -> bool:
    return not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone, or gone between the lookup and the status
        return False


def _environment_variable(name: str) -> str | None:
    return os.environ.get(name)


@pytest.fixture(autouse=True)
def _no_kept_grid():
    stop_idle_grids()  # each test starts with no grid kept from another
    yield
    stop_idle_grids()


def test_the_next_executor_takes_the_kept_grid_with_fresh_runners_and_no_state_of_the_last():
    with HTCGridExecutor(max_workers=1, initializer=initializer, initargs=("first",)) as first:
        agents = first._grid.agent_pids()
        first_runner = first.submit(getpid).result(timeout=T)
        assert first.submit(get_initialized).result(timeout=T) == ("first", 1)
    assert not _gone(agents)  # kept for the next one
    started = time.monotonic()
    with HTCGridExecutor(max_workers=1) as second:
        assert second._grid.agent_pids() == agents
        assert time.monotonic() - started < 0.5  # no Redis, control plane or agent to start
        # a fresh runner: the first executor's initializer state (a module global, imported by
        # reference) is not there, as it would not be in a new process pool's workers
        assert second.submit(get_initialized).result(timeout=T) == (None, 0)
        assert second.submit(getpid).result(timeout=T) != first_runner


def test_a_kept_grid_stops_after_its_idle_time(monkeypatch):
    monkeypatch.setenv(KEEP_IDLE_GRID_ENV, "0.5")
    with HTCGridExecutor(max_workers=1) as executor:
        executor.submit(getpid).result(timeout=T)
        agents = executor._grid.agent_pids()
        redis_pid = executor._grid.redis_server.pid
    wait_for(lambda: _gone([*agents, redis_pid]), timeout=15)


def test_with_keeping_off_the_grid_stops_with_its_executor(monkeypatch):
    monkeypatch.setenv(KEEP_IDLE_GRID_ENV, "0")
    with HTCGridExecutor(max_workers=1) as executor:
        assert executor.submit(getpid).result(timeout=T) != os.getpid()
        agents = executor._grid.agent_pids()
    assert _gone(agents)


def test_other_workers_or_a_changed_environment_get_a_new_grid_and_the_kept_one_stops(monkeypatch):
    with HTCGridExecutor(max_workers=1) as first:
        first.submit(getpid).result(timeout=T)
        first_agents = first._grid.agent_pids()
    with HTCGridExecutor(max_workers=2) as second:  # another size: a grid of its own
        second_agents = second._grid.agent_pids()
        assert len(second_agents) == 2
        assert _gone(first_agents)  # one grid at most is kept
    monkeypatch.setenv("HTCGRID_TEST_SET_BETWEEN", "seen")
    with HTCGridExecutor(max_workers=2) as third:  # the agents would not see the new variable
        assert set(third._grid.agent_pids()).isdisjoint(second_agents)
        assert third.submit(_environment_variable, "HTCGRID_TEST_SET_BETWEEN").result(timeout=T) == "seen"


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_bad_keep_time_is_refused_at_construction(monkeypatch, value):
    monkeypatch.setenv(KEEP_IDLE_GRID_ENV, value)
    with pytest.raises(ConfigurationError, match=KEEP_IDLE_GRID_ENV):
        HTCGridExecutor(max_workers=1)
