"""Workers die: runners and agents SIGKILLed mid-run. Every future still resolves, once, with
the right result; a task that kills its worker every time fails with the reason after the retry
limit; an agent survives the death of its runner."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
import time
from collections.abc import Callable

import fault_tasks
import pytest
from fault_helpers import DoneCounter, executions, older_than, sigkill, terminal_events
from support import wait_for

from htcgrid_executor import TaskFailedError, TaskState


class Killer(threading.Thread):
    """SIGKILLs a random runner every ``period`` seconds, and every ``agent_every``-th time a
    random agent instead, until stopped; but no sooner than ``per_kill`` more calls have ended
    since the last kill (``progress()`` counts them).

    Only processes older than a threshold are picked: a task retried after a kill runs in a fresh
    runner (or agent) that is left alone, so no single task is killed past its retry limit by
    bad luck, while every process that has settled into the run is fair game. Kills paced by
    progress hit each task about as often on a loaded machine as on an idle one: paced by the
    clock alone, a machine three times slower took three times the kills per task, and a task
    that waits in claimed batches was lost past 20 retries.
    """

    def __init__(self, grid, progress: Callable[[], int], *, per_kill: int = 6, period: float = 0.25,
                 agent_every: int = 4, seed: int = 7) -> None:
        super().__init__(name="test-killer", daemon=True)
        self.grid = grid
        self.progress = progress
        self.per_kill = per_kill
        self.period = period
        self.agent_every = agent_every
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.runners_killed = 0
        self.agents_killed = 0

    def run(self) -> None:
        tick, last = 0, self.progress()
        while not self.stop.wait(self.period):
            if self.progress() - last < self.per_kill:
                continue
            tick += 1
            if tick % self.agent_every == 0:
                agents = older_than(self.grid.agent_pids(), 2.0)
                if agents and sigkill(self.random.choice(agents)):
                    self.agents_killed += 1
                    last = self.progress()
            else:
                runners = older_than(self.grid.runner_pids(), 1.0)
                if runners and sigkill(self.random.choice(runners)):
                    self.runners_killed += 1
                    last = self.progress()

    def has_killed(self, *, runners: int, agents: int) -> bool:
        """Whether at least this many runners and agents have been killed so far."""
        return self.runners_killed >= runners and self.agents_killed >= agents


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_random_sigkills_during_a_long_run_lose_nothing_and_resolve_each_future_once(
        make_grid, make_executor, tmp_path, figures):
    # a kill every 0.25 s at most, and one per 6 calls ended, every fourth an agent (with its
    # whole claimed batch): far more loss than the executor's default of 2 retries is for. This
    # test is about nothing lost or run twice, not about the retry limit
    # (test_a_call_that_kills_its_worker_every_time_... pins that): on a loaded machine a task that
    # waits in claimed batches can be hit more than five times, so both limits are set high enough
    # that no kill pattern exhausts them.
    grid = make_grid(workers=2, retry_limit=20)
    executor = make_executor(grid, retry_count=20)
    log, map_log = tmp_path / "calls.log", tmp_path / "map.log"
    n_map, at_least, wave = 600, 600, 50
    executor.submit(fault_tasks.square, 0).result(30)  # runners warm: kills hit a steady run
    counter = DoneCounter()
    killer = Killer(grid, progress=lambda: len(counter.calls))
    futures: list = []
    killer.start()
    try:
        # a chunked map over the same grid at the same time, results in order
        mapped = executor.map(fault_tasks.logged_sleep_square, [str(map_log)] * n_map, range(n_map),
                              [0.0] * n_map, chunksize=20)
        # submits in waves, the next one sent when half of the last has ended, until both enough
        # calls and enough kills of each kind have happened: how long a fixed batch lasts depends
        # on the machine, and a run that ends before the kills tests nothing
        deadline = time.monotonic() + 90
        while (len(futures) < at_least or not killer.has_killed(runners=5, agents=2)) \
                and time.monotonic() < deadline:
            first = len(futures)
            sent = [executor.submit(fault_tasks.logged_sleep_square, str(log), i, 0.005)
                    for i in range(first, first + wave)]
            futures += sent
            counter.add(sent)
            concurrent.futures.wait(sent[:wave // 2], timeout=60)
        results = [f.result(timeout=120) for f in futures]
        map_results = list(mapped)
    finally:
        killer.stop.set()
        killer.join()
    time.sleep(0.2)  # a late duplicate resolution would show in the counts now

    n = len(futures)
    lost = sum(1 for i, got in enumerate(results) if got != i * i)
    lost += sum(1 for i, got in enumerate(map_results) if got != i * i)
    figures["tasks_run"] += n + n_map
    figures["results_lost"] += lost
    figures["runners_killed"] += killer.runners_killed
    figures["agents_killed"] += killer.agents_killed
    assert lost == 0 and len(map_results) == n_map
    counter.assert_each_once()
    # the faults really happened, and took work down with them
    assert killer.has_killed(runners=5, agents=2), (killer.runners_killed, killer.agents_killed)
    runs = executions(log)
    assert set(runs) == set(range(n))  # every call ran ...
    extra = sum(runs.values()) - n  # ... and ran again only where a kill took its first run
    assert extra <= killer.runners_killed + 16 * killer.agents_killed
    # on the grid, each task reached a terminal state exactly once, and it was "finished"
    ends = terminal_events(grid)
    assert ends and set(ends.values()) == {1}
    assert len(ends) == n + n_map // 20 + 1
    assert executor.sessions() == []  # nothing left outstanding


@pytest.mark.timeout(60)
def test_a_call_that_kills_its_worker_every_time_fails_with_the_reason_after_the_retry_limit(
        make_grid, make_executor, tmp_path, figures):
    grid = make_grid(workers=2)
    executor = make_executor(grid, retry_count=2)
    log = tmp_path / "attempts.log"
    future = executor.submit(fault_tasks.kill_my_worker, str(log))
    with pytest.raises(TaskFailedError) as failure:
        future.result(timeout=45)
    reason = failure.value.reason
    assert "runner process died (signal SIGKILL)" in reason
    assert "gave up after 2 retries" in reason
    assert failure.value.task_id and failure.value.task_id in str(failure.value)
    attempts = log.read_text().split()
    assert len(attempts) == 3 and len(set(attempts)) == 3  # three runs, each in its own runner
    figures["runners_killed"] += 3
    # the grid goes on serving
    assert executor.submit(fault_tasks.square, 9).result(timeout=30) == 81
    figures["tasks_run"] += 2


@pytest.mark.timeout(60)
def test_a_call_that_kills_its_worker_runs_three_times_by_default(make_grid, make_executor, tmp_path, figures):
    grid = make_grid(workers=2)  # the grid would allow 5 retries: the executor asks for 2
    executor = make_executor(grid)
    log = tmp_path / "attempts.log"
    with pytest.raises(TaskFailedError, match="gave up after 2 retries"):
        executor.submit(fault_tasks.kill_my_worker, str(log)).result(timeout=50)
    assert len(log.read_text().split()) == 3
    figures["runners_killed"] += 3
    figures["tasks_run"] += 1


@pytest.mark.timeout(60)
def test_the_grids_retry_limit_bounds_retries_of_lost_tasks(make_grid, make_executor, tmp_path):
    grid = make_grid(workers=1, retry_limit=1)
    executor = make_executor(grid, retry_count=None)  # the grid's default, bounded by its limit
    log = tmp_path / "attempts.log"
    with pytest.raises(TaskFailedError, match="gave up after 1 retries"):
        executor.submit(fault_tasks.kill_my_worker, str(log)).result(timeout=50)
    assert len(log.read_text().split()) == 2


def _fully_gone(pid: int) -> bool:
    """Dead, with every thread ended (a zombie whose other threads still exit is not reapable yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            zombie = stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        return zombie and os.listdir(f"/proc/{pid}/task") == [str(pid)]
    except FileNotFoundError:
        return True


@pytest.mark.timeout(60)
def test_an_agent_survives_the_death_of_its_idle_runner(make_grid, make_executor, tmp_path, figures):
    """A runner killed between tasks (the OOM killer, an operator) is replaced by its agent; the
    agent does not crash, and the next task is not charged a retry for a death it did not see."""
    grid = make_grid(workers=1)
    executor = make_executor(grid, retry_count=0)
    first = executor.submit(fault_tasks.getpid).result(timeout=30)
    (agent,) = grid.agent_pids()
    assert grid.runner_pids() == [first]
    assert sigkill(first)
    wait_for(lambda: _fully_gone(first))
    figures["runners_killed"] += 1
    second = executor.submit(fault_tasks.getpid).result(timeout=30)  # retry_count=0: no second try
    assert second != first
    assert grid.agent_pids() == [agent]  # the same agent: it did not die with its runner
    figures["tasks_run"] += 2


@pytest.mark.timeout(60)
def test_a_runner_that_dies_before_it_starts_its_batch_charges_no_task(make_grid, make_executor):
    grid = make_grid(workers=1)
    executor = make_executor(grid, retry_count=0)
    first = executor.submit(fault_tasks.getpid).result(timeout=30)
    (runner,) = grid.runner_pids()
    os.kill(runner, signal.SIGSTOP)  # alive, so the agent sends it the next batch; it never reads it
    try:
        future = executor.submit(fault_tasks.getpid)
        (record,) = executor.sessions(timeout=30)
        (task_id,) = record["task_ids"]
        wait_for(lambda: grid.table.task_state(task_id) is TaskState.PROCESSING, timeout=10)
        time.sleep(0.3)  # claimed, read and sent to the stopped runner
    finally:
        sigkill(runner)  # dies before it ever looked at the batch
    assert future.result(timeout=30) not in (first, runner)  # run in the next runner, not charged
