"""``executor.options(...)``: per-call grid options through a view of the executor, on the real
local grid: each option takes effect for the view's calls only, the view is a plain Executor to
library code, and its shutdown leaves the executor running."""

from __future__ import annotations

import time
from concurrent.futures import Executor, as_completed, wait

import pytest
from executor_tasks import (
    kill_runner_once,
    record_start,
    sleep_return,
    sleep_then_write,
    square,
    start_and_wait_for_file,
)

from htcgrid_executor import wire
from htcgrid_executor.errors import TaskFailedError
from htcgrid_executor.executor import ExecutorView, HTCGridExecutor
from htcgrid_executor.options import TaskOptions

pytestmark = pytest.mark.timeout(90)

T = 30


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_a_higher_priority_view_runs_first(grid_executor, tmp_path):
    markers = [tmp_path / f"busy-{i}" for i in range(2)]  # both agents busy while we queue
    gate = tmp_path / "gate"
    busy = [grid_executor.submit(start_and_wait_for_file, str(m), str(gate)) for m in markers]
    wait_until(lambda: all(m.exists() for m in markers) and all(f.running() for f in busy))
    order = tmp_path / "order"
    urgent = grid_executor.options(priority=10)
    low = [grid_executor.submit(record_start, str(order), "low") for _ in range(2)]
    high = [urgent.submit(record_start, str(order), "high") for _ in range(2)]
    grid_executor.sessions(flush=True, timeout=T)  # all sent, so queued, before an agent is free
    gate.touch()
    wait(busy + low + high, timeout=T)
    started = order.read_text().split()
    # the urgent calls are claimed first (in submission order the low ones would be), so the
    # first call to start is one of them; after it the order is the agents' race (the other
    # agent may have claimed the second urgent call but not yet started it when the first agent,
    # done with its urgent call, claims and starts a low one)
    assert sorted(started) == ["high", "high", "low", "low"]
    assert started[0] == "high", started
    assert urgent.task_options.priority == 10 and grid_executor.options().task_options.priority == 0


def test_a_time_limit_view_stops_its_calls_only(grid_executor, tmp_path):
    late = tmp_path / "late"
    limited = grid_executor.options(task_timeout_sec=0.5)
    stopped = limited.submit(sleep_then_write, str(late), 3.0)
    unlimited = grid_executor.submit(sleep_return, 1.0, "not limited")
    exc = stopped.exception(timeout=T)
    assert isinstance(exc, TaskFailedError) and "time limit" in exc.reason
    assert unlimited.result(timeout=T) == "not limited"
    assert not late.exists()


def test_a_retry_count_view_gives_up_sooner(grid_executor, tmp_path):
    no_retry = grid_executor.options(retry_count=0)
    given_up = no_retry.submit(kill_runner_once, str(tmp_path / "a"), "second try")
    retried = grid_executor.submit(kill_runner_once, str(tmp_path / "b"), "second try")  # 2 retries
    exc = given_up.exception(timeout=T)
    assert isinstance(exc, TaskFailedError) and "after 0 retries" in exc.reason
    assert retried.result(timeout=T) == "second try"


def library_code(executor: Executor, n: int) -> tuple[int, list[int], int]:
    """What a library taking any Executor does: a context manager, submit, wait, as_completed, map."""
    with executor:
        futures = [executor.submit(square, i) for i in range(n)]
        done, not_done = wait(futures, timeout=T)
        assert not not_done
        total = sum(future.result() for future in as_completed(futures, timeout=T))
        mapped = list(executor.map(square, range(n), timeout=T))
        slow = executor.submit(sleep_return, 0.3, 7)
    return total, mapped, slow.result(timeout=0)  # leaving `with` waited for it


def test_library_code_takes_a_view_as_an_executor_and_its_shutdown_spares_the_parent(grid_executor):
    view = grid_executor.options(priority=3, retry_count=1)
    assert isinstance(view, Executor)
    assert library_code(view, 6) == (55, [0, 1, 4, 9, 16, 25], 7)
    with pytest.raises(RuntimeError, match="view's shutdown"):
        view.submit(square, 2)
    assert grid_executor.submit(square, 5).result(timeout=T) == 25  # the executor goes on
    assert list(grid_executor.options(retry_count=0).map(square, [3])) == [9]


def test_a_view_shut_down_from_a_done_callback_does_not_deadlock(grid_executor):
    view = grid_executor.options(priority=1)
    done = []
    first = view.submit(square, 2)
    second = view.submit(sleep_return, 0.5, "later")
    first.add_done_callback(lambda _: (view.shutdown(wait=True), done.append(True)))
    assert second.result(timeout=T) == "later" and done == [True]


def test_calls_with_different_options_sent_together_get_one_session_per_options(grid):
    with HTCGridExecutor(config=grid.client_config, batch_window=0.2) as executor:
        other = executor.options(priority=7, retry_count=1, task_timeout_sec=30)
        futures = []
        for i in range(4):
            futures.append(executor.submit(sleep_return, 0.2, ("default", i)))
            futures.append(other.submit(sleep_return, 0.2, ("other", i)))
        records = executor.sessions(flush=True, timeout=T)
        store = executor._connector.store
        payloads = store.get_many([wire.payload_key(r["session_id"]) for r in records])
        seen = {}
        for record, raw in zip(records, payloads, strict=True):
            submission = wire.decode_submission(raw)
            options = (submission["context"]["tasks_priority"], submission["scheduler_data"]["retry_count"],
                       submission["scheduler_data"]["task_timeout_sec"])
            seen[options] = seen.get(options, 0) + len(record["task_ids"])
        assert seen == {(0, 2, 3600): 4, (7, 1, 30): 4}  # one window, two sessions
        assert [f.result(timeout=T)[0] for f in futures] == ["default", "other"] * 4


def test_bad_options_raise_naming_the_option(grid_executor):
    with pytest.raises(TypeError, match="priority"):
        grid_executor.options(priority="high")
    with pytest.raises(ValueError, match="priority"):
        grid_executor.options(priority=10**9)
    with pytest.raises(ValueError, match="task_timeout_sec"):
        grid_executor.options(task_timeout_sec=0)
    with pytest.raises(TypeError, match="retry_count"):
        grid_executor.options(retry_count=1.5)
    with pytest.raises(ValueError, match="retry_count"):
        grid_executor.options(retry_count=-1)
    with pytest.raises(TypeError, match="unknown task option"):
        TaskOptions().replace(retries=3)
    with pytest.raises(ValueError, match="task_timeout_sec"):
        HTCGridExecutor(config=grid_executor._connector.client_config, task_timeout_sec=-1)
    view = grid_executor.options(task_timeout_sec=None, retry_count=None)
    assert isinstance(view, ExecutorView)
    assert view.task_options == TaskOptions(task_timeout_sec=None, retry_count=None)
    assert view.options(priority=2).task_options.priority == 2
    assert grid_executor.submit(square, 3).result(timeout=T) == 9  # nothing broke


def test_the_defaults_of_a_tasks_options_are_spelt_once(grid_executor):
    """The executor's keywords default to TaskOptions' own defaults; an option not given to
    options() keeps the executor's value (and a view's), None included."""
    import inspect

    signature = inspect.signature(HTCGridExecutor.__init__).parameters
    defaults = TaskOptions()
    for name in ("priority", "task_timeout_sec", "retry_count"):
        assert signature[name].default == getattr(defaults, name)
    assert grid_executor.options().task_options == defaults
    view = grid_executor.options(priority=3, retry_count=None)
    assert view.options(task_timeout_sec=5).task_options == TaskOptions(priority=3, task_timeout_sec=5,
                                                                        retry_count=None)
