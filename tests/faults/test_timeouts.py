"""Hung calls and stragglers: a per-task time limit stops a hung user function and frees its
worker; a slow call does not hold back the results of the calls around it."""

from __future__ import annotations

import time
from concurrent.futures import wait

import fault_tasks
import pytest
from support import wait_for

from htcgrid_executor import TaskFailedError


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.timeout(60)
def test_a_hung_call_is_stopped_at_its_time_limit_and_its_worker_runs_the_next_call(
        make_grid, make_executor, tmp_path, figures):
    grid = make_grid(workers=1)
    executor = make_executor(grid, task_timeout_sec=1.0)
    marker, proof = tmp_path / "started", tmp_path / "proof"
    started = time.monotonic()
    hung = executor.submit(fault_tasks.hang_then_write, str(marker), str(proof), 60)
    after = executor.submit(fault_tasks.getpid)
    with pytest.raises(TaskFailedError) as failure:
        hung.result(timeout=20)
    assert "time limit of 1 s" in failure.value.reason and "stopped" in failure.value.reason
    assert 1.0 <= time.monotonic() - started < 10
    runner = int(marker.read_text())
    wait_for(lambda: _gone(runner), timeout=5)  # the user code was stopped, not left running
    assert after.result(timeout=10) != runner  # the one worker went on, in a new runner
    assert not proof.exists()
    figures["tasks_timed_out"] += 1
    figures["tasks_run"] += 2


@pytest.mark.timeout(60)
def test_hung_calls_among_many_fail_alone_and_are_not_retried(make_grid, make_executor, tmp_path, figures):
    grid = make_grid(workers=2)
    executor = make_executor(grid, task_timeout_sec=0.5)
    log = tmp_path / "hung.log"
    futures = []
    for i in range(300):
        if i % 75 == 10:
            futures.append(executor.submit(fault_tasks.logged_sleep_square, str(log), i, 30))
        else:
            futures.append(executor.submit(fault_tasks.square, i))
    done, not_done = wait(futures, timeout=30)
    assert not not_done
    failed = [i for i, f in enumerate(futures) if f.exception() is not None]
    assert failed == [10, 85, 160, 235]
    for i in failed:
        error = futures[i].exception()
        assert isinstance(error, TaskFailedError) and "time limit of 0.5 s" in error.reason
    assert all(futures[i].result() == i * i for i in range(300) if i not in failed)
    assert sorted(int(x) for x in log.read_text().split()) == failed  # each hung call ran once
    figures["tasks_timed_out"] += len(failed)
    figures["tasks_run"] += len(futures)


@pytest.mark.timeout(60)
def test_results_finished_before_a_straggler_are_delivered_while_it_runs(make_grid, make_executor, tmp_path):
    grid = make_grid(workers=1)
    executor = make_executor(grid, batch_window=0.3)  # one session: the agent claims them in batches
    gate = tmp_path / "gate"
    executor.submit(fault_tasks.square, 0).result(timeout=30)
    quick = [executor.submit(fault_tasks.square, i) for i in range(40)]
    straggler = executor.submit(fault_tasks.wait_for_file, str(gate), "late", 30)
    try:
        done, _ = wait(quick, timeout=5)
        assert len(done) == len(quick)  # they ran before it, on the one worker
    finally:
        gate.write_text("open")
    assert straggler.result(timeout=10) == "late"


@pytest.mark.timeout(60)
def test_calls_queued_behind_a_straggler_run_on_another_worker(make_grid, make_executor, tmp_path):
    grid = make_grid(workers=2)
    executor = make_executor(grid, batch_window=0.3)
    gate = tmp_path / "gate"
    wait([executor.submit(fault_tasks.square, i) for i in range(50)], timeout=30)
    quick = [executor.submit(fault_tasks.square, i) for i in range(60)]
    straggler = executor.submit(fault_tasks.wait_for_file, str(gate), "late", 30)
    quick += [executor.submit(fault_tasks.square, i) for i in range(60, 120)]
    try:
        done, _ = wait(quick, timeout=5)
        assert len(done) == len(quick)  # the other worker was free the whole time
    finally:
        gate.write_text("open")
    assert straggler.result(timeout=10) == "late"
