"""HTCGridExecutor on the real local grid: what only a grid does (workers lost, retries, time
limits, killing running tasks, raw tasks, attach after a crash, losing the grid) and what the
executor adds to the stdlib contract."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from concurrent.futures import CancelledError, wait

import psutil
import pytest
from executor_support import assert_no_executor_threads, fixture_grid, running_grid
from executor_tasks import (
    exit_process,
    failing_initializer,
    get_initialized,
    initializer,
    kill_runner_once,
    raise_unpicklable,
    sleep_return,
    sleep_then_write,
    square,
    start_and_sleep,
    start_and_wait_for_file,
    wait_for_file_then_return,
)

from htcgrid_executor import TaskState, wire
from htcgrid_executor.connector import AWSConnector
from htcgrid_executor.errors import (
    BadRequestError,
    BrokenGridExecutor,
    ConfigurationError,
    PayloadError,
    RemoteError,
    SignatureError,
    TaskFailedError,
)
from htcgrid_executor.executor import HTCGridExecutor
from htcgrid_executor.grid import LocalGrid
from htcgrid_executor.progress import progress

pytestmark = pytest.mark.timeout(90)

T = 30


def wait_until(predicate, timeout=15.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def occupy(executor, tmp_path, seconds, count=2):
    markers = [tmp_path / f"busy-{i}" for i in range(count)]
    futures = [executor.submit(start_and_sleep, str(m), seconds, i) for i, m in enumerate(markers)]
    wait_until(lambda: all(m.exists() for m in markers) and all(f.running() for f in futures))
    return futures


def occupy_until(executor, tmp_path, gate, count=2):
    """Futures that hold every worker until ``gate`` exists, returned once each call runs."""
    markers = [tmp_path / f"busy-{i}" for i in range(count)]
    futures = [executor.submit(start_and_wait_for_file, str(m), str(gate)) for m in markers]
    wait_until(lambda: all(m.exists() for m in markers) and all(f.running() for f in futures))
    return futures


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


# ------------------------------------------------------------------------------ pickling


def test_lambdas_and_closures_run_on_the_grid(grid_executor):
    base = 10
    assert grid_executor.submit(lambda x: x + base, 5).result(timeout=T) == 15
    assert list(grid_executor.map(lambda x, y: x * y + base, range(4), range(4))) == [10, 11, 14, 19]


def test_an_unpicklable_call_raises_at_submit_naming_the_culprit(grid_executor):
    lock = threading.Lock()
    with pytest.raises(PayloadError, match=r"positional argument 0 \(a lock\) of the call to 'square'") as info:
        grid_executor.submit(square, lock)
    assert "pickle" in str(info.value.__cause__)
    with pytest.raises(PayloadError, match=r"function '.*<lambda>'"):
        grid_executor.submit(lambda: lock)
    with pytest.raises(PayloadError, match=r"map over 'square'"):
        grid_executor.map(square, [1, 2, lock])
    assert grid_executor.submit(square, 3).result(timeout=T) == 9  # nothing broken


def test_an_unpicklable_exception_becomes_remote_error(grid_executor):
    exc = grid_executor.submit(raise_unpicklable).exception(timeout=T)
    assert isinstance(exc, RemoteError) and exc.type_name == "executor_tasks.UnpicklableError"
    assert "cannot travel" in str(exc) and "raise_unpicklable" in exc.remote_traceback


def test_a_function_is_pickled_once_per_batch_and_once_per_map(grid_executor, monkeypatch):
    import htcgrid_executor.executor as module

    calls = []
    real = module.pickle_function

    def counting(fn, key, scope):
        calls.append(fn)
        return real(fn, key, scope)

    monkeypatch.setattr(module, "pickle_function", counting)
    futures = [grid_executor.submit(square, i) for i in range(300)]
    assert [f.result(timeout=T) for f in futures] == [i * i for i in range(300)]
    assert len(calls) < 30  # one per batch sent, not one per call
    calls.clear()
    assert sum(grid_executor.map(square, range(500))) == sum(i * i for i in range(500))
    assert len(calls) == 1


MAIN_SCRIPT = textwrap.dedent("""
    import sys
    import executor_tasks
    from htcgrid_executor.executor import HTCGridExecutor

    class Point:  # defined in __main__: the worker has no such module, it travels by value
        def __init__(self, x, y):
            self.x, self.y = x, y

    def norm(p):
        return (p.x ** 2 + p.y ** 2) ** 0.5

    if __name__ == "__main__":
        with HTCGridExecutor(config=sys.argv[1]) as executor:
            print(executor.submit(norm, Point(3, 4)).result(30))
            back = executor.submit(executor_tasks.identity, Point(1, 2)).result(30)
            print(type(back).__name__, back.x, back.y)
            print(list(executor.map(norm, [Point(0, 1), Point(6, 8)])))
""")


def test_functions_and_classes_of_main_travel_by_value(grid, tmp_path):
    config_path = grid.write_client_config(tmp_path / "client-config.json")
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    child = subprocess.run([sys.executable, str(script), str(config_path)], capture_output=True, text=True,
                           env=child_env(), timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == ["5.0", "Point 1 2", "[1.0, 10.0]"]


# ------------------------------------------------------------------------------ workers lost


def test_a_runner_killed_mid_task_still_gives_the_result(grid_executor, tmp_path):
    assert grid_executor.submit(kill_runner_once, str(tmp_path / "once"), 42).result(timeout=T) == 42

    marker = tmp_path / "started"
    future = grid_executor.submit(start_and_sleep, str(marker), 1.0, "survived")
    wait_until(lambda: marker.exists() and marker.read_text())  # written, not just created
    victim = int(marker.read_text())
    assert victim in running_grid().runner_pids()
    marker.unlink()
    os.kill(victim, signal.SIGKILL)
    assert future.result(timeout=T) == "survived"
    assert int(marker.read_text()) != victim  # it ran again, in a new runner


def test_retries_exhausted_fail_the_task_with_the_reason(grid):
    with HTCGridExecutor(config=grid.client_config, retry_count=1) as executor:
        exc = executor.submit(exit_process, 3).exception(timeout=T)
        assert isinstance(exc, TaskFailedError)
        assert "exit code 3" in exc.reason and exc.task_id
        assert executor.submit(square, 4).result(timeout=T) == 16


def test_a_task_over_its_time_limit_is_stopped_and_failed(grid, tmp_path):
    path = tmp_path / "late"
    with HTCGridExecutor(config=grid.client_config, task_timeout_sec=0.5) as executor:
        exc = executor.submit(sleep_then_write, str(path), 3.0).exception(timeout=T)
        assert isinstance(exc, TaskFailedError) and "time limit" in exc.reason
    time.sleep(0.5)
    assert not path.exists()


@pytest.fixture(scope="module")
def short_lease_grid():
    with fixture_grid(workers=2, heartbeat_sec=0.2, lease_sec=1.0) as local_grid:
        yield local_grid


def test_an_agent_killed_mid_task_still_gives_the_result(short_lease_grid, tmp_path):
    marker = tmp_path / "started"
    with HTCGridExecutor(config=short_lease_grid.client_config) as executor:
        future = executor.submit(start_and_sleep, str(marker), 0.5, "survived")
        wait_until(lambda: marker.exists() and marker.read_text())  # written, not just created
        runner = int(marker.read_text())
        agent = psutil.Process(runner).parent().pid
        assert agent in short_lease_grid.agent_pids()
        os.kill(agent, signal.SIGKILL)
        assert future.result(timeout=T) == "survived"
        wait_until(lambda: len(short_lease_grid.agent_pids()) == 2)  # the grid replaced it


# ------------------------------------------------------------------------------ cancellation


def test_a_cancelled_pending_task_never_runs(grid_executor, tmp_path):
    gate = tmp_path / "gate"
    blockers = occupy_until(grid_executor, tmp_path, gate)
    path = tmp_path / "never"
    future = grid_executor.submit(sleep_then_write, str(path), 0.0)
    time.sleep(0.1)  # sent to the grid, where it waits for a worker
    assert future.cancel()
    done, _ = wait([future], timeout=0)  # waiters see it at once (no waiting for a worker)
    assert done == {future}
    gate.write_text("open")
    assert [f.result(timeout=T) for f in blockers] == [None, None]
    assert grid_executor.submit(square, 2).result(timeout=T) == 4  # the workers are free again
    time.sleep(0.3)
    assert not path.exists()


def _task_ids_in_order(executor) -> list[str]:
    """The task ids of the executor's outstanding calls, in submission order (sent first)."""
    return [tid for record in executor.sessions() for tid in record["task_ids"]]


def test_a_successful_cancel_has_cancelled_the_task_on_the_grid_before_it_returns(grid, grid_executor, tmp_path):
    # cancel() True is the stdlib's promise that the call never runs: the grid must hold the task
    # cancelled when cancel() returns, not once a background thread gets round to telling it (an
    # agent freed in between would run it; CI once caught that)
    gate = tmp_path / "gate"
    blockers = occupy_until(grid_executor, tmp_path, gate)
    paths = [tmp_path / f"never-{i}" for i in range(20)]
    futures = [grid_executor.submit(sleep_then_write, str(p), 0.0) for p in paths]
    task_ids = _task_ids_in_order(grid_executor)[-20:]  # sessions() sends what is buffered
    wait_until(lambda: all(grid.table.task_state(t) == TaskState.PENDING for t in task_ids))
    for future, tid in zip(futures, task_ids, strict=True):
        assert future.cancel()
        assert grid.table.task_state(tid) is None  # ended on the grid: no agent can claim it
        assert future.cancelled() and future.done()
    gate.write_text("open")
    assert [f.result(timeout=T) for f in blockers] == [None, None]
    assert grid_executor.submit(square, 2).result(timeout=T) == 4
    assert not any(p.exists() for p in paths)


def test_a_call_a_worker_has_claimed_cannot_be_cancelled_and_runs(grid, grid_executor, tmp_path):
    gate = tmp_path / "gate"
    blockers = occupy_until(grid_executor, tmp_path, gate)
    path = tmp_path / "runs"
    future = grid_executor.submit(sleep_then_write, str(path), 0.0)
    (tid,) = _task_ids_in_order(grid_executor)[-1:]
    wait_until(lambda: grid.table.task_state(tid) == TaskState.PENDING)
    # a worker takes it (as an agent's claim does) before the executor has heard of it
    assert [c.task_id for c in grid.table.claim("test-agent", 1, 30_000)] == [tid]
    assert not future.cancel()
    assert future.running()  # cancel() and running() agree at once, as under ProcessPoolExecutor
    grid.table.release("test-agent", [tid])  # back to the queue, for a real agent to run
    assert not future.cancel()  # a running future stays running
    gate.write_text("open")
    assert [f.result(timeout=T) for f in blockers] == [None, None]
    assert future.result(timeout=T) == "written" and path.exists()


def test_kill_running_stops_user_code(grid_executor, tmp_path):
    marker, gate = tmp_path / "begun", tmp_path / "gate"  # the gate never opens: 30 s unless stopped
    future = grid_executor.submit(start_and_wait_for_file, str(marker), str(gate))
    # the user code has begun (a task the grid reports running may still wait in its agent's
    # batch, and kill_running() then only skips it: no process to stop)
    wait_until(lambda: marker.exists() and marker.read_text() and future.running())
    runner = int(marker.read_text())
    started = time.monotonic()
    assert grid_executor.kill_running() == 1
    with pytest.raises(CancelledError):
        future.result(timeout=T)
    assert time.monotonic() - started < 1.0
    assert not future.cancelled()  # a running Future cannot become cancelled: it raises instead
    # the process running the call was killed, and the grid runs the next call
    wait_until(lambda: runner not in running_grid().runner_pids())
    assert grid_executor.submit(square, 3).result(timeout=T) == 9


def test_shutdown_with_kill_running_stops_everything_at_once(grid, tmp_path):
    executor = HTCGridExecutor(config=grid.client_config)
    paths = [tmp_path / f"never-{i}" for i in range(6)]
    futures = [executor.submit(sleep_then_write, str(p), 1.5) for p in paths]
    wait_until(lambda: sum(f.running() for f in futures) == 2)
    started = time.monotonic()
    executor.shutdown(wait=True, cancel_futures=True, kill_running=True)
    assert time.monotonic() - started < 1.5
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) == 4
    for f in futures:
        if not f.cancelled():
            with pytest.raises(CancelledError):
                f.result()
    time.sleep(1.8)
    assert not any(p.exists() for p in paths)


def test_shutdown_cancel_futures_cancels_thousands_quickly(grid, tmp_path):
    executor = HTCGridExecutor(config=grid.client_config)
    gate = tmp_path / "gate"
    # both workers held until every queued future is answered, however slow the machine: a
    # blocker that timed out would let the workers start queued calls before shutdown ran
    blockers = occupy_until(executor, tmp_path, gate)
    queued = [executor.submit(square, i) for i in range(3000)]
    executor.shutdown(wait=False, cancel_futures=True)
    wait_until(lambda: all(f.done() for f in queued), timeout=30)
    assert all(f.cancelled() for f in queued)
    gate.write_text("open")
    executor.shutdown(wait=True)
    assert [f.result() for f in blockers] == [None, None]  # begun calls run to their end


# ------------------------------------------------------------------------------ scale


@pytest.fixture(scope="module")
def fast_grid():
    """A grid with the default claim batching, for throughput."""
    with fixture_grid(workers=2) as local_grid:
        yield local_grid


def test_a_map_five_times_longer_with_buffersize_needs_no_more_memory(fast_grid):
    with HTCGridExecutor(config=fast_grid.client_config) as executor:
        assert sum(executor.map(square, range(1000), chunksize=10)) == sum(i * i for i in range(1000))

        def peak(n):
            tracemalloc.start()
            try:
                total = sum(executor.map(square, range(n), buffersize=400, chunksize=5))
                return total, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        total_small, peak_small = peak(8_000)
        started = time.monotonic()
        total_big, peak_big = peak(40_000)
        elapsed = time.monotonic() - started
        assert total_small == sum(i * i for i in range(8_000))
        assert total_big == sum(i * i for i in range(40_000))
        # five times the items, not five times the memory: what is in flight is bounded, not the
        # input (the margin is for the embedded grid's threads, whose answers grow under load)
        assert peak_big < peak_small * 3 + 2_000_000, (peak_small, peak_big)
        assert peak_big < 30_000_000
        print(f"40,000-item map: {elapsed:.1f} s, client peak {peak_big / 1e6:.1f} MB")


def test_map_chunksize_packs_calls_into_one_task(grid_executor, tmp_path):
    go = tmp_path / "go"
    iterator = grid_executor.map(wait_for_file_then_return, [str(go)] * 10, range(10), chunksize=5)
    records = grid_executor.sessions()
    assert sum(len(r["task_ids"]) for r in records) == 2
    go.write_text("go")
    assert list(iterator) == list(range(10))


# ------------------------------------------------------------------------------ initializer, raw tasks


def test_initializer_runs_once_per_runner(grid):
    with HTCGridExecutor(config=grid.client_config, initializer=initializer, initargs=("hello",)) as executor:
        results = [executor.submit(get_initialized).result(timeout=T) for _ in range(8)]
    assert {r[0] for r in results} == {"hello"} and {r[1] for r in results} == {1}


def test_a_failing_initializer_fails_the_task_not_the_executor(grid):
    with HTCGridExecutor(config=grid.client_config, initializer=failing_initializer) as executor:
        with pytest.raises(RuntimeError, match="initializer failed"):
            executor.submit(square, 3).result(timeout=T)
        with pytest.raises(RuntimeError, match="initializer failed"):
            executor.submit(square, 3).result(timeout=T)


@pytest.fixture(scope="module")
def raw_grid():
    """A grid whose worker function is a plain HTC-Grid handler, not ours."""
    with fixture_grid(workers=1, handler="executor_tasks:raw_handler") as local_grid:
        yield local_grid


def test_raw_task_dicts_give_their_decoded_outputs(raw_grid):
    with HTCGridExecutor(config=raw_grid.client_config) as executor:
        echoed = executor.submit_task({"worker_arguments": ["1000", "1", "1"]})
        text = executor.submit_task({"say": "hello"})
        failing = executor.submit_task({"fail": "on purpose"})
        assert echoed.result(timeout=T) == {"echo": {"worker_arguments": ["1000", "1", "1"]}}
        assert text.result(timeout=T) == "hello"
        exc = failing.exception(timeout=T)
        assert isinstance(exc, RemoteError) and exc.type_name == "ValueError" and "on purpose" in str(exc)
        with pytest.raises(PayloadError):
            executor.submit_task({"not json": object()})
        # a pickled call sent to a grid whose worker is not ours fails clearly
        with pytest.raises(PayloadError, match="lambda_handler"):
            executor.submit(square, 2).result(timeout=T)


# ------------------------------------------------------------------------------ signing


def test_a_client_with_the_wrong_secret_is_refused_by_the_workers(grid):
    config = dict(grid.client_config, payload_signing_key="not-the-grid-secret")
    with HTCGridExecutor(config=config) as executor:
        with pytest.raises(SignatureError):
            executor.submit(square, 2).result(timeout=T)


def test_a_client_without_the_secret_cannot_submit_calls(grid):
    config = {k: v for k, v in grid.client_config.items() if k != "payload_signing_key"}
    with HTCGridExecutor(config=config) as executor:
        with pytest.raises(ConfigurationError, match="payload_signing_key"):
            executor.submit(square, 2)


# ------------------------------------------------------------------------------ sessions, attach


def test_collected_sessions_are_deleted_from_the_data_plane(grid, tmp_path):
    gate = tmp_path / "gate"
    with HTCGridExecutor(config=grid.client_config) as executor:
        # the calls wait for the gate: a session collected before sessions() is read would be
        # missing from the records
        futures = [executor.submit(wait_for_file_then_return, str(gate), i * i) for i in range(20)]
        records = executor.sessions()
        gate.touch()
        assert [f.result(timeout=T) for f in futures] == [i * i for i in range(20)]
    task_ids = [tid for r in records for tid in r["task_ids"]]
    assert task_ids
    with AWSConnector(grid.client_config) as connector:
        keys = [wire.input_key(t) for t in task_ids] + [wire.output_key(t) for t in task_ids]
        assert connector.store.get_many(keys) == [None] * len(keys)


CRASHING_CLIENT = textwrap.dedent("""
    import json, os, signal, sys, time
    from executor_tasks import square, wait_for_file_then_return
    from htcgrid_executor.executor import HTCGridExecutor

    config, go = sys.argv[1], sys.argv[2]
    executor = HTCGridExecutor(config=config)
    quick = [executor.submit(square, i) for i in range(20)]
    futures = [executor.submit(wait_for_file_then_return, go, i) for i in range(5)]
    results = executor.map(wait_for_file_then_return, [go] * 4, range(100, 104), chunksize=2)
    print(json.dumps(executor.sessions()), flush=True)
    assert [f.result(30) for f in quick] == [i * i for i in range(20)]  # read before the crash
    time.sleep(0.3)  # the poller has moved its cursor past them (the grid trims what was read)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no shutdown, nothing else collected
""")


def test_attach_collects_the_results_of_a_crashed_client(grid, tmp_path):
    config_path = grid.write_client_config(tmp_path / "client-config.json")
    go = tmp_path / "go"
    client = subprocess.run([sys.executable, "-c", CRASHING_CLIENT, str(config_path), str(go)],
                            capture_output=True, text=True, env=child_env(), timeout=60)
    assert client.returncode == -signal.SIGKILL, client.stderr
    records = json.loads(client.stdout)
    assert sum(len(r["task_ids"]) for r in records) == 27
    go.write_text("go")
    futures = HTCGridExecutor.attach(json.loads(json.dumps(records)), config=str(config_path))
    results = [f.result(timeout=T) for f in futures]  # in the order of the records' tasks
    assert results == [i * i for i in range(20)] + [0, 1, 2, 3, 4, [100, 101], [102, 103]]
    assert_no_executor_threads()  # the attach executor's threads stopped by themselves
    task_ids = [tid for r in records for tid in r["task_ids"]]
    with AWSConnector(grid.client_config) as connector:
        assert connector.store.get_many([wire.input_key(t) for t in task_ids]) == [None] * len(task_ids)


def test_attach_to_an_unknown_session_fails_at_once(grid):
    record = {"session_id": "no-such-session", "task_ids": ["no-such-session_0"], "listener": "x"}
    (future,) = HTCGridExecutor.attach([record], config=grid.client_config, broken_after_sec=30)
    exc = future.exception(timeout=5)  # a 404 is an answer, not an outage: no deadline to wait for
    assert isinstance(exc, BadRequestError) and "unknown session" in str(exc)
    assert_no_executor_threads(timeout=5)


def test_attach_to_sessions_sent_by_the_plain_connector(grid):
    from htcgrid_executor.codec import make_task, pickle_args, pickle_function

    with AWSConnector(grid.client_config) as connector:
        key = connector.payload_signing_key
        fn_blob = pickle_function(square, key)
        answers = [connector.send([make_task(fn_blob, pickle_args(square, (i,), {}, key)) for i in range(n)])
                   for n in (3, 2)]
        futures = HTCGridExecutor.attach(answers, connector=connector)
        assert [f.result(timeout=T) for f in futures] == [0, 1, 4, 0, 1]
        assert_no_executor_threads(timeout=5)


def test_shutdown_with_wait_from_a_done_callback_does_not_deadlock(grid):
    executor = HTCGridExecutor(config=grid.client_config)
    called = threading.Event()

    def callback(_):
        executor.shutdown(wait=True)
        called.set()

    executor.submit(square, 2).add_done_callback(callback)
    assert called.wait(T)
    executor.shutdown(wait=True)


# ------------------------------------------------------------------------------ losing the grid


def test_a_lost_grid_breaks_the_executor_after_its_deadline():
    grid = LocalGrid(workers=1).start()
    try:
        connector = AWSConnector(grid.client_config)
        connector.transport.max_attempts = 1  # fail fast: the executor's deadline is under test
        executor = HTCGridExecutor(connector=connector, broken_after_sec=1.0)
        future = executor.submit(sleep_return, 30)
        wait_until(future.running)
    finally:
        grid.stop()
    started = time.monotonic()
    exc = future.exception(timeout=T)
    assert isinstance(exc, BrokenGridExecutor) and exc.__cause__ is not None
    assert time.monotonic() - started < 15
    with pytest.raises(BrokenGridExecutor):
        executor.submit(square, 1)
    executor.shutdown(wait=True)
    connector.close()


# ------------------------------------------------------------------------------ lifecycle


def test_a_config_file_path_is_accepted(grid, tmp_path):
    path = grid.write_client_config(tmp_path / "config.json")
    with HTCGridExecutor(config=str(path)) as executor:
        assert executor.submit(square, 12).result(timeout=T) == 144
    with pytest.raises(ConfigurationError, match="cannot read"):
        HTCGridExecutor(config=str(tmp_path / "missing.json"))


def test_an_executor_dropped_without_shutdown_winds_down(grid):
    executor = HTCGridExecutor(config=grid.client_config)
    future = executor.submit(sleep_return, 0.3, "kept")
    del executor
    gc.collect()
    assert future.result(timeout=T) == "kept"
    assert_no_executor_threads(timeout=5)


EXITING_SCRIPT = textwrap.dedent("""
    import sys
    from executor_tasks import sleep_return
    from htcgrid_executor.executor import HTCGridExecutor

    executor = HTCGridExecutor(max_workers=1)
    print(*executor._grid.agent_pids(), flush=True)
    future = executor.submit(sleep_return, 0.5, "finished at exit")
    future.add_done_callback(lambda f: print(f.result(), flush=True))
    # no shutdown(), no result(): the interpreter exits with work in flight
""")


def test_interpreter_exit_finishes_the_work_and_does_not_hang():
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-c", EXITING_SCRIPT], capture_output=True, text=True,
                           env=child_env(), timeout=60)
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines[-1] == "finished at exit"
    assert time.monotonic() - started < 30
    agents = [int(p) for p in lines[0].split()]
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                               for p in agents), timeout=5)


# ------------------------------------------------------------------------------ progress


def test_progress_over_futures_and_over_a_map(grid_executor, capsys):
    futures = [grid_executor.submit(square, i) for i in range(20)]
    assert sorted(f.result() for f in progress(futures, desc="futures")) == [i * i for i in range(20)]
    assert list(progress(grid_executor.map(square, range(30)), total=30, desc="map")) == [i * i for i in range(30)]
    err = capsys.readouterr().err
    assert "20/20" in err and "30/30" in err


def test_a_call_costs_one_data_plane_call_as_its_input_and_output_travel_with_the_routes(grid):
    """A small call's input goes in the body of /submit and its output comes in the /result
    answer: a call only deletes its data; an output past the answer's budget is read from the
    data plane."""
    with HTCGridExecutor(config=grid.client_config) as executor:
        stats = executor._connector.stats
        start, sent = stats()["dataplane_calls"], stats()["dataplane_bytes_sent"]  # what connecting took
        for i in range(5):
            assert executor.submit(pow, i, 2).result(timeout=30) == i * i
        # a session's data is deleted after its result (the deletes of several sessions may
        # share a call)
        wait_until(lambda: stats()["dataplane_calls"] > start)
        assert stats()["dataplane_calls"] <= start + 5 and stats()["dataplane_bytes_received"] == 0
        assert stats()["dataplane_bytes_sent"] == sent

        assert executor.submit(bytes, 2 << 20).result(timeout=30) == bytes(2 << 20)
        assert stats()["dataplane_bytes_received"] > 2 << 20
