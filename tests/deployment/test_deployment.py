"""The executor's promises on a deployment running upstream HTC-Grid's control plane (issue 10),
checked on a stand-in that behaves as upstream does (deployment_standin.py): it cannot cancel a
single task, re-runs a replayed submission, ignores time limits, retries a lost task 5 times and
answers results in no order. The worker handler's guard (worker_guard.py) keeps the promises."""

from __future__ import annotations

import time
import warnings
from concurrent.futures import CancelledError

import pytest
from deployment_tasks import double, record, runs, sleep, slow_record
from support import wait_for

from htcgrid_executor import TaskFailedError
from htcgrid_executor.cli import main as cli


def _wait_processing(standin, count: int, timeout: float = 10.0) -> None:
    wait_for(lambda: sum(standin.state(t) == "processing" for s in standin.sessions()
                         for t in standin.tasks_of(s)) >= count, timeout=timeout)


def _wait_begun(path, count: int, timeout: float = 10.0) -> None:
    # a claimed task's call has not begun until the handler took its run marker: only then is
    # it past cancelling, so a test that needs running calls waits for the calls themselves
    wait_for(lambda: len(runs(str(path) + ".begun")) >= count, timeout=timeout)


def test_cancelled_futures_return_at_once_and_their_calls_never_run(standin, make_executor, tmp_path):
    path = tmp_path / "runs"
    path.touch()
    executor = make_executor(batch_window=0.2)  # one session: the grid could only cancel all of it
    blockers = [executor.submit(sleep, 1.0) for _ in range(2)]
    victims = [executor.submit(record, str(path), i) for i in range(6)]
    keeper = executor.submit(record, str(path), 100)
    _wait_processing(standin, 2)
    started = time.monotonic()
    assert all(future.cancel() for future in victims)
    assert time.monotonic() - started < 0.2
    assert keeper.result(timeout=20) == 100
    assert [b.result(timeout=20) for b in blockers] == [1.0, 1.0]
    standin.wait_idle()
    assert runs(str(path)) == [100]  # the grid delivered the victims; the handler ran none of them


def test_shutdown_with_cancel_futures_returns_at_once(standin, make_executor, tmp_path):
    path = tmp_path / "runs"
    path.touch()
    executor = make_executor(batch_window=0.1)
    running = [executor.submit(slow_record, str(path), 100 + i, 1.5) for i in range(2)]
    queued = [executor.submit(record, str(path), i) for i in range(12)]
    _wait_begun(path, 2)
    started = time.monotonic()
    executor.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - started < 1.0
    assert all(f.cancelled() for f in queued) and not any(f.cancelled() for f in running)
    assert [f.result(timeout=30) for f in running] == [100, 101]
    standin.wait_idle()
    assert sorted(runs(str(path))) == [100, 101]  # no cancelled call ran


def test_shutdown_with_cancel_futures_lets_running_calls_finish(standin, make_executor, tmp_path):
    # as under ProcessPoolExecutor: a call a worker has begun is not cancelled; its future
    # gets its result, and shutdown(wait=True) waits for it, not for the queue behind it
    path = tmp_path / "runs"
    path.touch()
    executor = make_executor(batch_window=0.1)
    running = [executor.submit(slow_record, str(path), 100 + i, 1.0) for i in range(2)]
    queued = [executor.submit(record, str(path), i) for i in range(12)]
    _wait_begun(path, 2)
    started = time.monotonic()
    executor.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 2.0
    assert [f.result(timeout=0) for f in running] == [100, 101]
    assert all(f.cancelled() for f in queued)
    standin.wait_idle()
    assert sorted(runs(str(path))) == [100, 101]


def test_closing_a_map_early_returns_at_once_and_runs_no_more_calls(standin, make_executor, tmp_path):
    path = tmp_path / "runs"
    path.touch()
    executor = make_executor()
    results = executor.map(slow_record, [str(path)] * 10, range(10), [0.3] * 10, chunksize=1)
    assert next(results) == 0
    started = time.monotonic()
    results.close()
    assert time.monotonic() - started < 0.5
    standin.wait_idle()
    assert len(runs(str(path))) <= 4  # those under way when it was closed (2 agents), no more


def test_a_submission_answered_504_and_replayed_runs_each_call_once(standin, make_executor, tmp_path):
    path = tmp_path / "runs"
    path.touch()
    standin.submit_faults = 1  # the first POST /submit: work submitted, then 504
    executor = make_executor(batch_window=0.1)
    futures = [executor.submit(slow_record, str(path), i, 0.2) for i in range(6)]
    assert [f.result(timeout=30) for f in futures] == list(range(6))
    assert standin.count("POST", "/submit") >= 2  # it was replayed, and upstream re-queued it all
    standin.wait_idle()
    assert sorted(runs(str(path))) == list(range(6))


def test_a_call_over_its_time_limit_fails_with_task_failed_error(make_executor):
    executor = make_executor(task_timeout_sec=0.5)
    started = time.monotonic()
    with pytest.raises(TaskFailedError, match="time limit"):
        executor.submit(sleep, 5.0).result(timeout=20)
    assert time.monotonic() - started < 3.0  # stopped at its limit, not after it ran to the end


def test_retry_count_zero_fails_a_call_whose_worker_was_lost(standin, make_executor, tmp_path):
    path = tmp_path / "runs"
    path.touch()
    executor = make_executor(retry_count=0)
    future = executor.submit(slow_record, str(path), 1, 3.0)
    sid = executor.sessions()[0]["session_id"]
    _wait_begun(path, 1)  # killed before its marker was taken, the call would be run again
    assert standin.kill_agent_running(standin.tasks_of(sid)[0])
    with pytest.raises(TaskFailedError, match="retry_count=0"):
        future.result(timeout=20)  # the grid retried it (5 times, fixed): the handler refused
    standin.wait_idle()
    assert runs(str(path)) == []


def test_per_call_options_reach_the_guard_of_each_task(standin, make_executor, tmp_path):
    executor = make_executor(batch_window=0.1)  # no time limit, 2 retries
    limited = executor.options(task_timeout_sec=0.5)
    stopped = limited.submit(sleep, 5.0)
    unlimited = executor.submit(sleep, 1.0)  # in the same send round, in its own session
    with pytest.raises(TaskFailedError, match="time limit"):
        stopped.result(timeout=20)
    assert unlimited.result(timeout=20) == 1.0
    path = tmp_path / "runs"
    path.touch()
    future = executor.options(retry_count=0).submit(slow_record, str(path), 1, 3.0)
    sid = executor.sessions()[0]["session_id"]
    _wait_begun(path, 1)  # killed before its marker was taken, the call would be run again
    assert standin.kill_agent_running(standin.tasks_of(sid)[0])
    with pytest.raises(TaskFailedError, match="retry_count=0"):
        future.result(timeout=20)
    standin.wait_idle()
    assert runs(str(path)) == []


def test_status_of_a_running_session_counts_pending_and_processing_from_the_run_markers(standin, make_executor):
    executor = make_executor(batch_window=0.2)
    futures = [executor.submit(sleep, 1.0) for _ in range(3)]  # one session, 2 agents
    [record] = executor.sessions()
    _wait_processing(standin, 2)
    deadline = time.monotonic() + 10
    while (status := executor._connector.session_status(record["session_id"])).processing < 2:
        assert time.monotonic() < deadline, status  # the guard takes its run marker as the call starts
        time.sleep(0.02)
    assert (status.count, status.pending, status.finished, status.failed, status.exact) == (3, 1, 0, 0, False)
    assert [f.result(timeout=20) for f in futures] == [1.0] * 3


def test_cli_status_of_a_collected_session_counts_it_finished(standin, make_executor, tmp_path, capsys):
    executor = make_executor()
    future = executor.submit(double, 21)
    sid = executor.sessions()[0]["session_id"]
    assert future.result(timeout=20) == 42
    executor.shutdown(wait=True)  # collected: its data is deleted from the data plane
    config = tmp_path / "config.json"
    config.write_text(__import__("json").dumps(standin.client_config()))
    capsys.readouterr()
    assert cli(["status", "--config", str(config), sid]) == 0
    # finished, failed, cancelled from the deployment's API; pending/processing unknown once the
    # session's data (its payload) was deleted
    assert capsys.readouterr().out.split()[-6:] == [sid, "?", "?", "1", "0", "0"]


def test_map_picks_its_chunks_and_polls_no_faster_than_the_interval(standin, make_executor):
    executor = make_executor()
    before = set(standin.sessions())
    polls = standin.count("GET", "/result")
    started = time.monotonic()
    assert list(executor.map(double, range(200))) == [2 * i for i in range(200)]
    elapsed = time.monotonic() - started
    tasks = sum(len(standin.tasks_of(s)) for s in set(standin.sessions()) - before)
    assert tasks <= 10  # 200 calls in a few tasks: a deployment's per-task overhead is large
    interval = standin.client_config()["dynamodb_results_pull_interval_sec"]
    assert standin.count("GET", "/result") - polls <= elapsed / interval + 2
    polls = standin.count("GET", "/result")
    time.sleep(0.6)
    assert standin.count("GET", "/result") == polls  # a collected session is never polled again
    before = set(standin.sessions())
    assert list(executor.map(double, range(20), chunksize=1)) == [2 * i for i in range(20)]
    assert sum(len(standin.tasks_of(s)) for s in set(standin.sessions()) - before) == 20  # explicit wins


def test_the_cancelled_answer_of_the_handler_raises_cancelled_error():
    from htcgrid_executor.codec import decode_output

    ok, exc = decode_output('{"htcgrid_executor": 1, "ok": false, "error": "cancelled", "message": "m"}', "k")
    assert not ok and isinstance(exc, CancelledError)


def test_without_the_guard_the_executor_warns_once_what_it_cannot_keep(standin, make_executor):
    from htcgrid_executor import _deployment

    _deployment._warned.clear()
    with pytest.warns(RuntimeWarning, match="htcgrid_worker_guard is off"):
        first = make_executor_without_guard(standin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = make_executor_without_guard(standin)  # once a process, not once an executor
    for executor in (first, second):
        assert executor.submit(double, 2).result(timeout=20) == 4
        executor.shutdown()


def make_executor_without_guard(standin):
    from htcgrid_executor import HTCGridExecutor

    return HTCGridExecutor(config=standin.client_config(htcgrid_worker_guard=False))


def test_a_forged_guard_is_refused_before_the_worker_connects_anywhere(monkeypatch):
    """The guard names where the worker connects with its Redis password: only a holder of the
    grid secret may name it (a writer of the data plane could otherwise steal the password)."""
    from htcgrid_executor import worker_guard
    from htcgrid_executor.codec import make_task, pickle_args, pickle_function
    from htcgrid_executor.worker import lambda_handler

    monkeypatch.setenv("HTCGRID_PAYLOAD_KEY", "the-grid-secret")
    task = make_task(pickle_function(double, "the-grid-secret"), pickle_args(double, (1,), {}, "the-grid-secret"))
    task["guard"] = worker_guard.seal_guard({"store": "REDIS", "redis_url": "redis://attacker.example:6379"},
                                            "s_0", "another-key", task_timeout_sec=None, retry_count=None)
    connected = []
    monkeypatch.setattr(worker_guard, "_marks_for", lambda spec: connected.append(spec))
    answer = lambda_handler(task, None)
    assert answer["error"] == "signature" and connected == []


def test_a_task_sealed_for_another_task_than_its_guard_is_refused(monkeypatch, tmp_path):
    """On a deployment the handler learns its task id from the guard: an input sealed for another
    task (a whole input copied onto this task's key, with this task's guard) is refused unrun."""
    from htcgrid_executor import worker_guard
    from htcgrid_executor.codec import make_task, pickle_args, pickle_function, seal_task
    from htcgrid_executor.worker import lambda_handler

    class Marks:  # the run marker always says "run": only the seal decides
        def begin(self, tid, owner, lease, attempts):
            return "run", {}

        def renew(self, tid, owner, lease):
            return True

        def finish(self, tid, owner, envelope):
            pass

    key = "the-grid-secret"
    monkeypatch.setenv("HTCGRID_PAYLOAD_KEY", key)
    monkeypatch.setattr(worker_guard, "_marks_for", lambda spec: Marks())
    task = seal_task(make_task(pickle_function(double, key), pickle_args(double, (1,), {}, key)), "s_0", key)
    location = {"store": "REDIS", "redis_url": "redis://grid.example:6379"}
    for guarded_for, ok in (("s_0", True), ("s_1", False)):
        guard = worker_guard.seal_guard(location, guarded_for, key, task_timeout_sec=None, retry_count=None)
        answer = lambda_handler({**task, "guard": guard}, None)
        assert answer["ok"] is ok, answer
    assert answer["error"] == "signature" and "sealed for task s_0, not for s_1" in answer["message"]


def test_the_guard_never_carries_the_redis_password():
    from htcgrid_executor.connector.config import ClientConfig
    from htcgrid_executor.worker_guard import guard_location

    config = ClientConfig.from_dict({"grid_storage_service": "REDIS", "redis_url": "redis://:s3cret@db.internal:6380/0",
                                     "private_api_gateway_url": "http://x", "public_api_gateway_url": "http://x",
                                     "api_gateway_key": "k", "intra_vpc": 1})
    assert guard_location(config) == {"store": "REDIS", "redis_url": "redis://db.internal:6380/0"}
