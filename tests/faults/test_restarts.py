"""The grid's servers restart under a running client: the HTTP control plane (the client retries
through the outage) and Redis (its append-only file keeps tasks and results). Nothing submitted
is lost, nothing runs twice."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import wait

import fault_tasks
import pytest
import redis
from fault_helpers import DoneCounter, executions, terminal_events
from support import wait_for

from htcgrid_executor import BrokenGridExecutor, GridError, HTCGridExecutor
from htcgrid_executor.codec import decode_output, make_task, pickle_args, pickle_function
from htcgrid_executor.grid import agent as agent_module
from htcgrid_executor.grid.agent import Agent, AgentSettings
from htcgrid_executor.grid.child_processes import describe_exit
from htcgrid_executor.grid.local_grid import start_agent_process
from htcgrid_executor.grid.redis_server import RedisServer
from htcgrid_executor.grid.task_inputs import INLINE_INPUT_BYTES


def _check_exactly_once(futures, counter, log, n, figures, timeout=90):
    """Each future ``i`` resolved once with ``i * i``; each call ran exactly once."""
    wait(futures, timeout=timeout)
    time.sleep(0.2)  # a late duplicate resolution would show in the counts now
    lost = [(i, "not done" if not f.done() else repr(f.exception()) if f.exception() is not None
             else f"returned {f.result()!r}")
            for i, f in enumerate(futures)
            if not f.done() or f.exception() is not None or f.result() != i * i]
    figures["tasks_run"] += n
    figures["results_lost"] += len(lost)
    assert len(lost) == 0, lost[:5]
    counter.assert_each_once()
    runs = executions(log)
    assert set(runs) == set(range(n))
    assert set(runs.values()) == {1}, {i: c for i, c in runs.items() if c > 1}  # none ran twice


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_run_rides_through_control_plane_restarts_and_nothing_is_lost_or_run_twice(
        make_grid, make_executor, tmp_path, figures):
    grid = make_grid(workers=2)
    executor = make_executor(grid)
    log = tmp_path / "calls.log"
    n = 2000
    futures = [executor.submit(fault_tasks.logged_sleep_square, str(log), i, 0.002) for i in range(n // 2)]
    restarts = 0

    def restart_twice() -> None:
        nonlocal restarts
        for _ in range(2):
            grid.restart_control_plane(down_sec=1.0)
            restarts += 1
            time.sleep(0.5)

    wait_for(lambda: any(f.done() for f in futures), timeout=30)  # under way
    restarter = threading.Thread(target=restart_twice)
    restarter.start()
    # calls submitted while the control plane is down are sent once it is back
    for i in range(n // 2, n):
        futures.append(executor.submit(fault_tasks.logged_sleep_square, str(log), i, 0.002))
        if i % 100 == 0:
            time.sleep(0.1)
    restarter.join()
    counter = DoneCounter(futures)
    _check_exactly_once(futures, counter, log, n, figures)
    figures["control_plane_restarts"] += restarts
    assert set(terminal_events(grid).values()) == {1}


@pytest.mark.timeout(60)
def test_a_send_issued_during_the_outage_is_retried_with_the_same_session(make_grid, make_connector):
    """The connector retries /submit with the same session id: the grid keeps one copy."""
    grid = make_grid(workers=1)
    connector = make_connector(grid)
    key = grid.payload_signing_key
    fn = pickle_function(fault_tasks.square, key)
    tasks = [make_task(fn, pickle_args(fault_tasks.square, (i,), {}, key)) for i in range(20)]
    restarter = threading.Thread(target=grid.restart_control_plane, kwargs={"down_sec": 1.5})
    restarter.start()
    time.sleep(0.2)  # down now
    started = time.monotonic()
    response = connector.send(tasks)
    assert time.monotonic() - started >= 0.5  # it did wait for the control plane
    restarter.join()
    answer = connector.get_results(response, timeout_sec=30)
    assert answer["finished"] == response["task_ids"]
    assert [decode_output(text, key) for text in answer["finished_OUTPUT"]] == [
        (True, i * i) for i in range(20)]
    assert grid.table.session_info(response["session_id"])["count"] == 20


@pytest.mark.timeout(90)
def test_queued_running_and_finished_tasks_survive_redis_restarts(make_grid, make_executor, make_connector,
                                                                  tmp_path, figures):
    """Redis restarts (twice) while one task runs, hundreds wait in the queue and a session's
    results wait uncollected: the append-only file keeps them all."""
    grid = make_grid(workers=1, folder=tmp_path / "grid")
    key = grid.payload_signing_key
    connector = make_connector(grid)
    fn = pickle_function(fault_tasks.square, key)
    early = connector.send([make_task(fn, pickle_args(fault_tasks.square, (i,), {}, key)) for i in range(200)])
    wait_for(lambda: grid.table.session_info(early["session_id"])["finished"] == 200, timeout=30)

    executor = make_executor(grid)
    log, gate, marker = tmp_path / "calls.log", tmp_path / "gate", tmp_path / "running"
    running = executor.submit(fault_tasks.hang_then_write, str(marker), str(tmp_path / "proof"), 0)
    wait_for(marker.exists, timeout=30)
    blocked = executor.submit(fault_tasks.wait_for_file, str(gate), "gated")
    n = 500
    futures = [executor.submit(fault_tasks.logged_square, str(log), i) for i in range(n)]
    counter = DoneCounter(futures)
    executor.sessions(timeout=30)  # all sent: they wait in the grid's queue behind the gated call
    for _ in range(2):
        grid.restart_redis()
        time.sleep(0.3)
    figures["redis_restarts"] += 2
    gate.write_text("open")

    assert running.result(timeout=30) == "finished"
    assert blocked.result(timeout=30) == "gated"
    _check_exactly_once(futures, counter, log, n, figures)
    answer = connector.get_results(early, timeout_sec=30)
    assert answer["finished"] == early["task_ids"]
    assert [decode_output(text, key) for text in answer["finished_OUTPUT"]] == [(True, i * i) for i in range(200)]
    figures["tasks_run"] += 202
    assert set(terminal_events(grid).values()) == {1}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_redis_restart_in_the_middle_of_a_busy_run_loses_nothing(make_grid, make_executor, tmp_path,
                                                                   figures):
    grid = make_grid(workers=2, folder=tmp_path / "grid")
    # each restart may cost the tasks in flight a lease (a retry); this test is about nothing
    # lost or run twice, so it gives them the grid's 5 retries, not the executor's default 2
    executor = make_executor(grid, retry_count=5)
    log = tmp_path / "calls.log"
    n = 1000
    futures = [executor.submit(fault_tasks.logged_sleep_square, str(log), i, 0.003) for i in range(n)]
    counter = DoneCounter(futures)
    wait_for(lambda: sum(f.done() for f in futures) > 100, timeout=30)
    grid.restart_redis()  # agents are completing tasks at this very moment
    wait_for(lambda: sum(f.done() for f in futures) > 500, timeout=30)
    grid.restart_redis()
    figures["redis_restarts"] += 2
    _check_exactly_once(futures, counter, log, n, figures, timeout=60)
    assert set(terminal_events(grid).values()) == {1}


@pytest.mark.timeout(60)
def test_an_outage_longer_than_the_deadline_fails_every_pending_future_instead_of_hanging(
        make_grid, make_executor, tmp_path):
    grid = make_grid(workers=1)
    executor = make_executor(grid, broken_after_sec=2)
    assert executor.submit(fault_tasks.square, 2).result(timeout=30) == 4
    waiting = [executor.submit(fault_tasks.wait_for_file, str(tmp_path / "gate"), i) for i in range(3)]
    executor.sessions(timeout=30)
    outage = threading.Thread(target=grid.restart_control_plane, kwargs={"down_sec": 6})
    outage.start()
    try:
        time.sleep(0.3)
        unsent = executor.submit(fault_tasks.square, 3)  # accepted, but cannot be sent
        started = time.monotonic()
        done, not_done = wait([*waiting, unsent], timeout=20)
        assert not not_done
        assert time.monotonic() - started < 10
        for future in done:
            assert isinstance(future.exception(), BrokenGridExecutor)
            assert "cannot" in str(future.exception())
        with pytest.raises(BrokenGridExecutor):
            executor.submit(fault_tasks.square, 4)  # and it says so at once from now on
    finally:
        outage.join()


@pytest.mark.timeout(60)
def test_a_grid_that_lost_its_state_fails_the_futures_instead_of_hanging(make_grid, tmp_path):
    grid = make_grid(workers=1)  # no folder: a Redis restart loses every task
    # not make_executor: its shutdown(wait=True) would wait for these futures as well; this one
    # breaks (and its threads end) once the grid is stopped after the test
    executor = HTCGridExecutor(config=grid.client_config, broken_after_sec=3)
    try:
        gate = tmp_path / "gate"
        futures = [executor.submit(fault_tasks.wait_for_file, str(gate), i, 30) for i in range(3)]
        executor.sessions(timeout=30)
        grid.restart_redis()
        # the grid forgot the sessions (all it may hold is the TTL checker's time of its last sweep,
        # and the agents' counters, which they write again at their next heartbeat)
        assert set(grid.redis.keys()) - set(grid.redis.keys("htcgrid:agent:*:stats")) <= {b"htcgrid:swept_ms"}
        gate.write_text("open")
        done, not_done = wait(futures, timeout=10)
        assert not not_done, "futures of sessions the grid no longer knows never resolve"
        for future in done:
            assert isinstance(future.exception(), GridError)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(60)
def test_an_agent_started_while_redis_is_down_waits_for_it_and_then_works(make_grid, make_executor):
    """An agent that joins from another machine (``htcgrid-executor agent``) has no supervisor to
    restart it: started before its grid's Redis is up (a reboot, a network blip), it must wait."""
    password, key = "agent-test-password", "agent-test-signing-key"
    port = _free_port()
    agent = start_agent_process(
        AgentSettings(redis_url=f"redis://:{password}@127.0.0.1:{port}/0", heartbeat_sec=0.2, lease_sec=1.0),
        key)
    server = None
    try:
        time.sleep(1.5)  # Redis is not there yet
        assert agent.poll() is None, f"the agent gave up: {describe_exit(agent.returncode)}"
        server = RedisServer(port=port, password=password).start()
        grid = make_grid(workers=0, redis_url=server.url, payload_signing_key=key)
        executor = make_executor(grid)
        assert executor.submit(fault_tasks.getpid).result(timeout=30) != agent.pid  # its runner ran it
    finally:
        agent.terminate()
        agent.wait(10)
        if server is not None:
            server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _InputsUnreadableOnce:
    """The agent's read of the inputs too big to come with the claim, failing the first time as
    a Redis going away would, right after the claim (the window a restart of Redis hits in a
    busy run)."""

    def __init__(self, read) -> None:
        self._read = read
        self.failed = False

    def __call__(self, client, task_ids):
        if not self.failed:
            self.failed = True
            raise redis.exceptions.ConnectionError("Redis went away between the claim and the read")
        return self._read(client, task_ids)


@pytest.mark.timeout(60)
def test_a_claimed_batch_whose_inputs_cannot_be_read_is_given_back_and_runs(make_grid, make_connector,
                                                                             monkeypatch):
    grid = make_grid(workers=0, handler="handlers:identity")
    settings = AgentSettings(redis_url=grid.redis_server.unix_url_for("agent"), handler="handlers:identity",
                             heartbeat_sec=0.2, lease_sec=1.0, max_batch=4)
    agent = Agent(settings)
    flaky = _InputsUnreadableOnce(agent_module.read_inputs)
    monkeypatch.setattr(agent_module, "read_inputs", flaky)
    thread = threading.Thread(target=agent.run, name="test-agent", daemon=True)
    thread.start()
    try:
        conn = make_connector(grid)
        pad = "x" * INLINE_INPUT_BYTES  # too big to come with the claim: the agent reads it after
        answer = conn.send([{"n": i, "pad": pad} for i in range(3)])
        result = conn.get_results(answer, timeout_sec=20)
        assert flaky.failed  # the fault was hit
        # claimed before the failure, they were given back (not held under a live heartbeat for
        # ever) and the same agent ran them once Redis answered
        assert result["finished"] == answer["task_ids"]
        assert [json.loads(out) if isinstance(out, str) else out for out in result["finished_OUTPUT"]] \
            == [{"n": i, "pad": pad} for i in range(3)]
    finally:
        agent.stop_event.set()
        thread.join(15)
    assert not thread.is_alive()
