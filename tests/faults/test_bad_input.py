"""Bad input through the executor and the connector, on one live grid: each is refused with a
clear error that names the problem, and the grid serves the next request as if nothing happened.

(The HTTP routes' own malformed-request and fuzz tests are in tests/grid/test_http_api.py.)
"""

from __future__ import annotations

import math
import threading
import time

import fault_tasks
import pytest
from support import FAST, wait_for

from htcgrid_executor import (
    BadRequestError,
    GridError,
    HTCGridExecutor,
    PayloadError,
    RemoteError,
)
from htcgrid_executor.codec import decode_output, make_task, pickle_args, pickle_function
from htcgrid_executor.connector import AWSConnector
from htcgrid_executor.grid import LocalGrid


@pytest.fixture(scope="module")
def grid():
    # a small data-plane limit, so that size tests stay fast (the default is 500 MiB)
    with LocalGrid(workers=2, max_payload_bytes=LIMIT, **FAST) as grid:
        yield grid


LIMIT = 8_000_000


@pytest.fixture(scope="module")
def executor(grid):
    executor = HTCGridExecutor(config=grid.client_config, broken_after_sec=30)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True, kill_running=True)


@pytest.fixture(scope="module")
def connector(grid):
    with AWSConnector(grid.client_config) as connector:
        yield connector


@pytest.fixture(autouse=True)
def still_serving(grid, executor, connector, figures):
    """After every bad input: a call through the executor and a session through the connector
    still run, and no data-plane key was left behind by a refused request."""
    before = _data_keys(grid)
    yield
    assert executor.submit(fault_tasks.square, 12).result(timeout=30) == 144
    key = grid.payload_signing_key
    fn = pickle_function(fault_tasks.square, key)
    response = connector.send([make_task(fn, pickle_args(fault_tasks.square, (5,), {}, key))])
    answer = connector.get_results(response, timeout_sec=30)
    assert [decode_output(text, key) for text in answer["finished_OUTPUT"]] == [(True, 25)]
    connector.delete_session_data(response)
    # the executor deletes collected sessions' keys from its sender thread, gathered every 0.25 s
    deadline = time.monotonic() + 10
    while not _data_keys(grid) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _data_keys(grid) <= before
    figures["tasks_run"] += 2


def _data_keys(grid) -> set[bytes]:
    return {k for k in grid.redis.scan_iter(count=1000) if not k.startswith(b"htcgrid:")}


class LockHolder:
    """A callable that cannot be pickled."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, x):
        return x


# ------------------------------------------------------------------------------- the executor


def test_an_unpicklable_argument_is_refused_in_the_caller(executor, figures):
    with pytest.raises(PayloadError, match=r"positional argument 1 \(a lock\).*square"):
        executor.submit(fault_tasks.square, 1, threading.Lock())
    with pytest.raises(PayloadError, match="keyword argument 'x'"):
        executor.submit(fault_tasks.square, x=threading.Lock())
    figures["bad_inputs"] += 2


def test_an_unpicklable_function_is_refused_in_the_caller(executor, figures):
    with pytest.raises(PayloadError, match="cannot pickle the function 'LockHolder'"):
        executor.submit(LockHolder(), 1)
    with pytest.raises(PayloadError, match="cannot pickle the function"):
        executor.map(LockHolder(), range(3))
    figures["bad_inputs"] += 2


def test_an_unpicklable_map_item_is_refused_and_nothing_of_the_map_runs(executor, grid, figures):
    sessions_before = len(list(grid.redis.scan_iter(match="htcgrid:session:*", count=1000)))
    with pytest.raises(PayloadError, match="positional argument 0 \\(a lock\\)"):
        executor.map(fault_tasks.square, [1, 2, threading.Lock(), 4], chunksize=2)
    time.sleep(0.2)
    assert len(list(grid.redis.scan_iter(match="htcgrid:session:*", count=1000))) == sessions_before
    figures["bad_inputs"] += 1


def test_an_unpicklable_result_is_the_futures_error(executor, figures):
    with pytest.raises(PayloadError, match="cannot pickle"):
        executor.submit(fault_tasks.return_a_lock).result(timeout=30)
    results = executor.map(fault_tasks.chunk_item_result, range(6), chunksize=2)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(PayloadError, match="cannot pickle"):
        next(results)  # the chunk holding item 3 fails where its first result would be
    figures["bad_inputs"] += 2


def test_an_exception_that_cannot_be_pickled_comes_back_as_remote_error(executor, figures):
    with pytest.raises(RemoteError) as failure:
        executor.submit(fault_tasks.raise_locked_error).result(timeout=30)
    error = failure.value
    assert error.type_name == "fault_tasks.LockedError"
    assert "this one cannot travel" in str(error)
    assert "raise_locked_error" in error.remote_traceback
    figures["bad_inputs"] += 1


def test_an_exception_that_cannot_be_unpickled_comes_back_as_remote_error(executor, figures):
    with pytest.raises(RemoteError) as failure:
        executor.submit(fault_tasks.raise_stubborn_error).result(timeout=30)
    assert failure.value.type_name == "fault_tasks.StubbornError"
    assert "half-travelling (7)" in str(failure.value)
    assert "raise_stubborn_error" in failure.value.remote_traceback
    figures["bad_inputs"] += 1


def test_a_result_over_the_limit_fails_its_call_before_it_is_written(executor, figures):
    """5 MB of bytes takes ~8.9 MB in the data plane (pickled, then twice base64): over the grid's
    limit, which the executor read from the grid's config and sent with the task."""
    with pytest.raises(PayloadError, match=r"result of the call is too large for the grid: 8,88\d,\d{3} "
                       r"bytes .* over the limit of 8,000,000 bytes \(max_payload_bytes\)"):
        executor.submit(fault_tasks.return_bytes, 5_000_000).result(timeout=60)
    figures["bad_inputs"] += 1


def test_the_grid_refuses_a_result_over_its_limit_whatever_the_client_says(grid, figures):
    """A client that does not know the grid's limit: the agent refuses the output itself."""
    unaware = {k: v for k, v in grid.client_config.items() if k != "max_payload_bytes"}
    with HTCGridExecutor(config=unaware) as executor:
        with pytest.raises(GridError) as failure:
            executor.submit(fault_tasks.return_bytes, 5_000_000).result(timeout=60)
    assert "exceeds the data plane limit of 8000000 bytes" in str(failure.value)
    assert "ResponseSizeTooLarge" in str(failure.value)
    figures["bad_inputs"] += 1


def test_a_call_over_the_limit_is_refused_at_submit(executor, figures):
    with pytest.raises(PayloadError, match=r"call to 'identity' is too large for the grid: .* over the "
                       r"limit of 8,000,000 bytes"):
        executor.submit(fault_tasks.identity, b"x" * 5_000_000)
    with pytest.raises(PayloadError, match="too large"):
        executor.map(fault_tasks.identity, [b"x" * 2_000_000 + bytes([i]) for i in range(4)], chunksize=4)
    figures["bad_inputs"] += 2


def test_a_result_just_under_the_limit_comes_back_whole(executor):
    data = executor.submit(fault_tasks.return_bytes, 4_000_000).result(timeout=60)
    assert data == b"x" * 4_000_000


def test_wrong_types_through_the_executor(executor, figures):
    with pytest.raises(TypeError):
        executor.map(fault_tasks.square, 5)  # not iterable
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(fault_tasks.square, range(3), chunksize=0)
    not_callable = executor.submit(5)
    with pytest.raises((TypeError, PayloadError), match="callable"):
        not_callable.result(timeout=30)
    for bad_task in ({"x": math.nan}, {"x": object()}, {"x": b"bytes"}):
        with pytest.raises(PayloadError, match="not JSON-serialisable"):
            executor.submit_task(bad_task)
    figures["bad_inputs"] += 6


# ------------------------------------------------------------------------------- the connector


@pytest.mark.parametrize("tasks", [[math.inf], [{"a": object()}], [b"raw bytes"], [{"a": 1}, {1, 2}]],
                         ids=["infinity", "object", "bytes", "set"])
def test_non_json_tasks_are_refused_before_anything_is_written(connector, tasks, figures):
    with pytest.raises(PayloadError, match=f"task {len(tasks) - 1} of tasks_list: task is not JSON"):
        connector.send(tasks)
    figures["bad_inputs"] += 1


@pytest.mark.parametrize("args,kwargs,words", [
    (("not a list",), {}, "tasks_list must be a list"),
    ((None,), {}, "tasks_list must be a list"),
    (({"a": 1},), {}, "tasks_list must be a list"),
    (([],), {}, "empty"),
    (([{}],), {"priority": "high"}, "priority"),
    (([{}],), {"priority": True}, "priority"),
    (([{}],), {"priority": 10**7}, "tasks_priority"),  # refused by the grid, after the upload
    (([{}],), {"task_timeout_sec": -1}, "task_timeout_sec"),
    (([{}],), {"task_timeout_sec": "soon"}, "task_timeout_sec"),
    (([{}],), {"retry_count": -1}, "retry_count"),
    (([{}],), {"retry_count": 10**6}, "retry_count"),  # refused by the grid
    (([{}],), {"session_id": "has_underscore"}, "session_id"),
    (([{}],), {"listener": "bad id!"}, "listener"),
])
def test_wrong_send_arguments_are_bad_requests(connector, args, kwargs, words, figures):
    with pytest.raises(BadRequestError, match=words):
        connector.send(*args, **kwargs)
    figures["bad_inputs"] += 1


@pytest.mark.parametrize("response,words", [
    ({"session_id": "no-such-session", "task_ids": ["no-such-session_0"]}, "unknown session"),
    ("a-session-id", "the dict that send"),
    ({"session_id": 3, "task_ids": []}, "session_id"),
    ({"session_id": "s", "task_ids": "s_0"}, "task_ids"),
    ({"task_ids": []}, "session_id"),
])
def test_unknown_sessions_and_wrong_shapes_in_get_results(connector, response, words, figures):
    with pytest.raises(BadRequestError, match=words):
        connector.get_results(response, timeout_sec=5)
    figures["bad_inputs"] += 1


def test_unknown_sessions_elsewhere(connector, figures):
    with pytest.raises(BadRequestError, match="unknown session"):
        connector.poll_session("no-such-session")
    assert connector.cancel_sessions(["no-such-session"]) == {"no-such-session": {
        "cancelled_pending": 0, "cancelled_processing": 0, "total_cancelled_tasks": 0}}
    with pytest.raises(BadRequestError, match="list of session ids"):
        connector.cancel_sessions("no-such-session")
    with pytest.raises(BadRequestError, match="task id"):
        connector.cancel_tasks(["no-underscore"])
    connector.delete_session_data({"session_id": "no-such-session", "task_ids": ["no-such-session_0"]})
    figures["bad_inputs"] += 5


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_huge_task_list_is_one_session_that_can_be_cancelled_and_cleaned_up(make_grid, make_connector,
                                                                             figures):
    grid = make_grid(workers=0)  # nothing runs: the size is what is tested
    connector = make_connector(grid)
    n = 100_000
    started = time.monotonic()
    response = connector.send([{"i": i} for i in range(n)])
    sent_in = time.monotonic() - started
    assert response["task_ids"] == [f"{response['session_id']}_{i}" for i in range(n)]
    assert grid.table.session_info(response["session_id"])["pending"] == n
    answer = connector.cancel_sessions([response["session_id"]])
    assert answer[response["session_id"]]["cancelled_pending"] == n
    result = connector.get_results(response, timeout_sec=30)
    assert result["metadata"]["tasks_in_response"] == n and len(result["cancelled"]) == n
    connector.delete_session_data(response)
    assert not any(k for k in grid.redis.scan_iter(match=f"{response['session_id']}*", count=10_000))
    assert sent_in < 60
    figures["bad_inputs"] += 1


@pytest.mark.timeout(90)
def test_a_result_the_full_data_plane_cannot_take_fails_alone(make_grid, make_executor, figures):
    """Redis refuses writes once full (``maxmemory``, never evicting): a result that does not fit
    fails its future with a clear error, and the agent goes on with the next call."""
    grid = make_grid(workers=1)
    executor = make_executor(grid)
    assert executor.submit(fault_tasks.square, 2).result(timeout=30) == 4
    (agent,) = grid.agent_pids()
    limit = grid.redis.info("memory")["used_memory"] + 3 * 2**20
    grid.redis.config_set("maxmemory", limit)
    try:
        too_big = executor.submit(fault_tasks.return_bytes, 8_000_000)
        error = too_big.exception(timeout=10)
        assert isinstance(error, GridError) and "memory" in str(error).lower(), error
        # Redis frees the refused write's buffers within a few seconds; then the grid serves again
        wait_for(lambda: grid.redis.info("memory")["used_memory"] < limit, timeout=15, interval=0.2)
        assert executor.submit(fault_tasks.square, 3).result(timeout=15) == 9
        assert grid.agent_pids() == [agent]
    finally:
        grid.redis.config_set("maxmemory", 0)
    figures["bad_inputs"] += 1
