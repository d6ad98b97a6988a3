"""The connector against the real local grid: real HTTP, real Redis, real agent processes."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from htcgrid_executor import wire
from htcgrid_executor.connector import ApiKeyAuth, AWSConnector, HTTPTransport, ResultBatch
from htcgrid_executor.errors import AuthenticationError, BadRequestError, GridUnavailableError
from htcgrid_executor.grid import LocalGrid

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def grid() -> Iterator[LocalGrid]:
    with LocalGrid(workers=2, handler="handlers:report") as grid:
        yield grid


@pytest.fixture
def conn(grid: LocalGrid) -> Iterator[AWSConnector]:
    with AWSConnector(grid.client_config) as conn:
        yield conn


def outputs(result: dict[str, Any]) -> dict[str, Any]:
    return {tid: json.loads(text) for tid, text in zip(result["finished"], result["finished_OUTPUT"], strict=True)}


def wait_until_processing(conn: AWSConnector, listener: str, sessions: list[dict[str, Any]], count: int) -> str:
    """Long-poll the listener until ``count`` tasks started; returns the cursor."""
    started: set[str] = set()
    cursor = None
    deadline = time.monotonic() + 60
    while len(started) < count:
        assert time.monotonic() < deadline, "tasks did not start"
        batch = conn.poll_listener(listener, sessions, cursor, wait_sec=5)
        started.update(batch.processing)
        cursor = batch.cursor
    assert cursor is not None
    return cursor


def test_send_and_blocking_get_results(conn: AWSConnector) -> None:
    tasks = [{"n": i, "text": "é" * i} for i in range(20)]
    answer = conn.send(tasks)
    result = conn.get_results(answer)  # the seed's default: no time limit
    assert result["finished"] == answer["task_ids"]  # in submission order
    assert [out["event"] for out in outputs(result).values()] == tasks
    assert result["failed"] == result["cancelled"] == result["failed_reason"] == []
    assert result["metadata"] == {"tasks_in_response": 20}
    assert conn.extensions is True  # the local grid offers cursors and long polls


def test_get_results_with_timeout_returns_what_is_done(conn: AWSConnector) -> None:
    answer = conn.send([{"quick": 0}, {"quick": 1}, {"sleep": 60}, {"sleep": 60}])
    quick = answer["task_ids"][:2]
    # the quick ones first (blocking, no limit), so that what follows does not depend on the load
    assert conn.get_results({"session_id": answer["session_id"], "task_ids": quick})["finished"] == quick
    started = time.monotonic()
    result = conn.get_results(answer, timeout_sec=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 10
    assert result["finished"] == quick
    assert result["metadata"]["tasks_in_response"] == 2 < len(answer["task_ids"])
    # the sleepers are stopped by a cancel, and then every task is terminal
    counts = conn.cancel_sessions([answer["session_id"]])
    assert counts[answer["session_id"]]["total_cancelled_tasks"] == 2
    result = conn.get_results(answer, timeout_sec=30)
    assert result["finished"] == quick and result["cancelled"] == answer["task_ids"][2:]
    assert result["cancelled_OUTPUT"] == [wire.OUTPUT_PLACEHOLDER] * 2
    assert result["metadata"]["tasks_in_response"] == 4


def test_cancel_sessions_seed_shape(conn: AWSConnector) -> None:
    listener = conn.new_listener_id()
    first = conn.send([{"sleep": 60}] * 5, listener=listener)
    second = conn.send([{"sleep": 60}], listener=listener)
    wait_until_processing(conn, listener, [first, second], 1)
    started = time.monotonic()
    answer = conn.cancel_sessions([first["session_id"], second["session_id"]])
    assert set(answer) == {first["session_id"], second["session_id"]}
    for sid, size in ((first["session_id"], 5), (second["session_id"], 1)):
        counts = answer[sid]
        assert set(counts) >= {"cancelled_pending", "cancelled_processing", "total_cancelled_tasks"}
        assert counts["cancelled_pending"] + counts["cancelled_processing"] == counts["total_cancelled_tasks"] == size
    assert sum(answer[s]["cancelled_processing"] for s in answer) >= 1
    for sub in (first, second):
        result = conn.get_results(sub, timeout_sec=30)
        assert result["cancelled"] == sub["task_ids"]
    assert time.monotonic() - started < 30  # the 60 s tasks did not have to end first
    # cancelling again changes nothing
    again = conn.cancel_sessions([first["session_id"]])
    assert again[first["session_id"]]["total_cancelled_tasks"] == 0


def test_cancel_tasks(conn: AWSConnector) -> None:
    answer = conn.send([{"sleep": 60}, {"quick": True}])
    slow, quick = answer["task_ids"]
    assert conn.get_results({"session_id": answer["session_id"], "task_ids": [quick]})["finished"] == [quick]
    counts = conn.cancel_tasks([slow, quick])
    assert counts["total_cancelled_tasks"] == 1  # the finished one is not counted
    result = conn.get_results(answer, timeout_sec=30)
    assert result["finished"] == [quick] and result["cancelled"] == [slow]


def test_failed_task_carries_the_grids_reason(conn: AWSConnector) -> None:
    answer = conn.send([{"sleep": 60}], task_timeout_sec=0.5, retry_count=0)
    result = conn.get_results(answer, timeout_sec=60)
    assert result["failed"] == answer["task_ids"]
    assert result["failed_reason"][0]  # e.g. "time limit of 0.5 s exceeded"


def test_worker_exception_is_a_finished_task_with_lambdas_error_document(conn: AWSConnector) -> None:
    answer = conn.send([{"raise": "boom"}])
    [out] = outputs(conn.get_results(answer, timeout_sec=60)).values()
    assert out["errorType"] == "ValueError" and out["errorMessage"] == "boom"


def test_resubmitting_the_same_session_never_runs_twice(conn: AWSConnector, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    tasks = [{"log": str(log), "i": i} for i in range(4)]
    sid = wire.new_session_id()
    first = conn.send(tasks, session_id=sid)
    again = conn.send(tasks, session_id=sid)  # what a caller does after a submit timed out
    assert first == again
    result = conn.get_results(first, timeout_sec=60)
    assert len(result["finished"]) == 4
    assert sorted(log.read_text().split()) == sorted(first["task_ids"])  # each ran once


def test_priorities(tmp_path: Path) -> None:
    # one worker taking one task at a time: the order it picks tasks in is the priority order
    with LocalGrid(workers=1, handler="handlers:report", claim_batch=1) as grid, \
            AWSConnector(grid.client_config) as conn:
        listener = conn.new_listener_id()
        blocker = conn.send([{"sleep": 0.5}], listener=listener)
        wait_until_processing(conn, listener, [blocker], 1)
        low = conn.send([{"p": "low"}] * 4, priority=0)
        high = conn.send([{"p": "high"}] * 4, priority=5)
        started = {}
        for sub in (low, high):
            result = conn.get_results(sub, timeout_sec=60)
            started.update({tid: out["started"] for tid, out in outputs(result).items()})
        assert max(started[t] for t in high["task_ids"]) < min(started[t] for t in low["task_ids"])


def test_poll_listener_long_poll(conn: AWSConnector) -> None:
    listener = conn.new_listener_id()
    sessions = [conn.send([{"sleep": 0.2}, {"i": 1}], listener=listener),
                conn.send([{"i": 2}], listener=listener)]
    all_ids = {tid for s in sessions for tid in s["task_ids"]}
    finished: dict[str, str] = {}
    processing: set[str] = set()
    cursor = None
    started = time.monotonic()
    while set(finished) != all_ids:
        assert time.monotonic() - started < 60
        batch = conn.poll_listener(listener, sessions, cursor, wait_sec=10)
        assert batch.extensions is True and batch.cursor is not None and batch.cursor != cursor
        assert not set(batch.finished) & set(finished)  # each change is reported once
        finished.update(batch.finished)
        processing.update(batch.processing)
        cursor = batch.cursor
    assert processing == all_ids
    assert json.loads(finished[sessions[1]["task_ids"][0]])["event"] == {"i": 2}

    # nothing left to change: the long poll waits its time, then returns an empty batch
    t0 = time.monotonic()
    batch = conn.poll_listener(listener, sessions, cursor, wait_sec=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5
    assert not batch and batch.cursor == cursor

    # a waiting long poll wakes up when a new task of the listener changes state
    result: list[ResultBatch] = []
    waiter = threading.Thread(target=lambda: result.append(
        conn.poll_listener(listener, sessions, cursor, wait_sec=20)))
    waiter.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    late = conn.send([{"late": True}], listener=listener)
    waiter.join(30)
    assert time.monotonic() - t0 < 15  # woke up well before its 20 s wait ran out
    assert result and set(result[0].processing) | set(result[0].finished) == set(late["task_ids"])


def test_poll_session_cursor(conn: AWSConnector) -> None:
    answer = conn.send([{"i": i} for i in range(3)])
    seen: dict[str, str] = {}
    cursor = None
    while len(seen) < 3:
        batch = conn.poll_session(answer["session_id"], after=cursor, wait_sec=5)
        assert batch.extensions and not set(batch.finished) & set(seen)
        seen.update(batch.finished)
        cursor = batch.cursor
    assert set(seen) == set(answer["task_ids"])


def test_delete_session_data(conn: AWSConnector, grid: LocalGrid) -> None:
    answer = conn.send([{"i": 1}, {"i": 2}])
    assert len(conn.get_results(answer, timeout_sec=60)["finished"]) == 2
    sid = answer["session_id"]
    assert grid.redis.keys(f"{sid}*")
    conn.delete_session_data(answer)
    assert grid.redis.keys(f"{sid}*") == []


def test_grid_errors_reach_the_caller(grid: LocalGrid) -> None:
    with AWSConnector(dict(grid.client_config, api_gateway_key="wrong")) as conn:
        with pytest.raises(AuthenticationError) as info:
            conn.poll_session(wire.new_session_id())
        assert info.value.status == 403
    with AWSConnector(grid.client_config) as conn:
        with pytest.raises(BadRequestError, match="unknown session") as bad:
            conn.get_results({"session_id": wire.new_session_id(), "task_ids": []})
        assert bad.value.status == 404


# ------------------------------------------------------------------------------ round trip, any JSON

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def echo_conn() -> Iterator[AWSConnector]:
    with LocalGrid(workers=2, handler="handlers:identity") as grid, \
            AWSConnector(grid.client_config) as conn:
        yield conn


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tasks=st.lists(JSON, min_size=1, max_size=6))
def test_any_json_task_round_trips(echo_conn: AWSConnector, tasks: list[Any]) -> None:
    answer = echo_conn.send(tasks)
    result = echo_conn.get_results(answer, timeout_sec=60)
    assert result["finished"] == answer["task_ids"]
    assert [json.loads(text) for text in result["finished_OUTPUT"]] == tasks


def test_stats_count_what_the_connector_and_the_agents_did(grid: LocalGrid) -> None:
    with AWSConnector(grid.client_config) as conn:
        assert conn.stats()["round_trips"] == 0
        agents_before = sum(s["tasks_claimed"] for s in grid.agent_stats().values())
        answer = conn.send([{"n": i} for i in range(10)])
        result = conn.get_results(answer)
        assert len(result["finished"]) == 10
        stats = conn.stats()
        routes = stats["http_requests_by_route"]
        assert routes["/submit"] == 1 and routes["/result"] == stats["polls"] >= 1
        assert stats["long_polls"] == stats["polls"]  # get_results waits on the grid, never spins
        assert stats["http_requests"] == sum(routes.values()) == stats["http_round_trips"]
        assert stats["retries"] == 0
        # the inputs went in the body of /submit (a small session); one read of the outputs
        assert stats["dataplane_calls"] == 1
        assert stats["round_trips"] == stats["http_round_trips"] + stats["dataplane_calls"]
        assert stats["dataplane_bytes_sent"] == 0 and stats["dataplane_bytes_received"] > 10
        assert stats["bytes_sent"] > 0 and stats["bytes_received"] > 0

    # a control plane nobody answers at: every attempt is a round trip, every repeat a retry
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    dead_url = f"http://127.0.0.1:{dead_port}"
    fast = HTTPTransport(dead_url, ApiKeyAuth(grid.client_config["api_gateway_key"]), max_attempts=3, backoff_sec=0.001)
    with AWSConnector({**grid.client_config, "private_api_gateway_url": dead_url}, transport=fast) as dead:
        with pytest.raises(GridUnavailableError):
            dead.poll_session(answer["session_id"])
        failed = dead.stats()
        assert failed["http_requests"] == 1 and failed["http_round_trips"] == 3 and failed["retries"] == 2

    # the agents publish their counters at their heartbeat (every second)
    deadline = time.monotonic() + 10
    while sum(s["tasks_claimed"] for s in grid.agent_stats().values()) < agents_before + 10:
        assert time.monotonic() < deadline, grid.agent_stats()
        time.sleep(0.1)
    for counters in grid.agent_stats().values():
        assert counters["heartbeats"] >= 1 and counters["claims"] <= counters["tasks_claimed"]


def test_a_small_session_goes_in_its_submit_and_a_big_one_through_the_data_plane() -> None:
    """Each runs alike and leaves its data under the same keys; only a big one (in bytes or in
    tasks) costs the client a data-plane write."""
    big_value = "x" * wire.INLINE_SUBMIT_BYTES
    many = [{"n": i} for i in range(wire.INLINE_SUBMIT_TASKS + 1)]
    with LocalGrid(workers=1, handler="handlers:identity") as grid, AWSConnector(grid.client_config) as conn:
        for tasks, writes in (([{"n": 1}, {"n": 2}], 0), ([{"n": big_value}], 1), (many, 1)):
            before = conn.stats()["dataplane_calls"]
            answer = conn.send(tasks)
            assert conn.stats()["dataplane_calls"] - before == writes
            assert grid.redis.exists(wire.payload_key(answer["session_id"]),
                                     *map(wire.input_key, answer["task_ids"])) == len(tasks) + 1
            result = conn.get_results(answer, timeout_sec=60)
            assert [json.loads(text) for text in result["finished_OUTPUT"]] == tasks
