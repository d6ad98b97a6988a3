"""The exact wire format, pinned against a recording HTTP server and a real Redis data plane."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import pytest
from connector_fixtures import *  # noqa: F403 - pytest fixtures
from connector_helpers import RecordingGrid, config_for, fast_transport

from htcgrid_executor import wire
from htcgrid_executor.connector import AWSConnector, ResultBatch
from htcgrid_executor.errors import (
    AuthenticationError,
    BadRequestError,
    ControlPlaneError,
    GridUnavailableError,
    PayloadError,
)

STATS_KEYS = {
    "stage1_grid_api_01_task_creation_tstmp": " ",
    "stage1_grid_api_02_task_submission_tstmp": "upload_data_to_storage",
    "stage2_sbmtlmba_01_invocation_tstmp": "grid_api_2_lambda_ms",
    "stage2_sbmtlmba_02_before_batch_write_tstmp": "task_construction_ms",
    "stage3_agent_01_task_acquired_sqs_tstmp": "sqs_queuing_time_ms",
    "stage3_agent_02_task_acquired_ddb_tstmp": "ddb_task_claiming_time_ms",
    "stage4_agent_01_user_code_finished_tstmp": "user_code_exec_time_ms",
    "stage4_agent_02_S3_stdout_delivered_tstmp": "S3_stdout_upload_time_ms",
}


def put_outputs(redis_db: Any, outputs: dict[str, str]) -> None:
    redis_db.mset({wire.output_key(tid): base64.b64encode(text.encode()) for tid, text in outputs.items()})


def plain_answer(finished: list[str] = (), failed: list[str] = (), cancelled: list[str] = ()) -> dict[str, Any]:
    """A deployment's /result answer: placeholders, no extensions."""
    return {
        "finished": list(finished), "finished_OUTPUT": ["read_from_dataplane"] * len(finished),
        "failed": list(failed), "failed_OUTPUT": ["read_from_dataplane"] * len(failed),
        "cancelled": list(cancelled), "cancelled_OUTPUT": ["read_from_dataplane"] * len(cancelled),
        "metadata": {"tasks_in_response": len(finished) + len(failed) + len(cancelled)},
    }


def cursor_answer(cursor: str, finished: list[str] = (), failed: dict[str, str] | None = None,
                  cancelled: list[str] = (), processing: list[str] = ()) -> dict[str, Any]:
    body = plain_answer(finished, list(failed or {}), cancelled)
    body["failed_reason"] = list((failed or {}).values())
    body["processing"] = list(processing)
    body["cursor"] = cursor
    return body


# ------------------------------------------------------------------------------------------- send


def test_send_writes_inputs_and_payload_then_posts_the_session_id(wired: Any) -> None:
    conn, grid, redis_db = wired
    tasks = [{"x": 1, "name": "ünïcode"}, [1, 2.5, None, True], "text", 7]
    listener = AWSConnector.new_listener_id()
    before = wire.now_ms()
    answer = conn.send(tasks, priority=3, listener=listener, task_timeout_sec=60, retry_count=2)
    sid, task_ids = answer["session_id"], answer["task_ids"]
    assert task_ids == [f"{sid}_{i}" for i in range(len(tasks))]
    assert "_" not in sid

    # data plane: <task_id>-input = standard base64 of json.dumps(task)
    for tid, task in zip(task_ids, tasks, strict=True):
        raw = redis_db.get(f"{tid}-input")
        assert raw == base64.b64encode(json.dumps(task).encode())
    # <sid>-payload = urlsafe base64 of the submission object, every stats key present
    payload = json.loads(base64.urlsafe_b64decode(redis_db.get(f"{sid}-payload")))
    assert set(payload) == {"session_id", "scheduler_data", "stats", "context", "tasks_list"}
    assert payload["session_id"] == sid
    assert payload["tasks_list"] == {"tasks": task_ids}
    assert payload["context"] == {"tasks_priority": 3, "listener": listener}
    assert payload["scheduler_data"]["task_timeout_sec"] == 60
    assert payload["scheduler_data"]["retry_count"] == 2
    assert set(payload["scheduler_data"]) == {"task_timeout_sec", "retry_count", "tstamp_api_grid_connector_ms",
                                              "tstamp_agent_read_from_sqs_ms"}
    assert {k: v["label"] for k, v in payload["stats"].items()} == STATS_KEYS
    for name in ("stage1_grid_api_01_task_creation_tstmp", "stage1_grid_api_02_task_submission_tstmp"):
        assert before <= payload["stats"][name]["tstmp"] <= wire.now_ms()
    assert redis_db.dbsize() == len(tasks) + 1

    # control plane: POST /submit?submission_content=<sid>, no body, x-api-key, no Authorization
    [req] = grid.calls()
    assert (req.method, req.path) == ("POST", "/submit")
    assert req.params == {"submission_content": [sid]}
    assert req.body == b""
    assert req.headers["x-api-key"] == "the-api-key"
    assert "authorization" not in req.headers


def test_send_defaults_match_a_deployment(wired: Any) -> None:
    conn, _, redis_db = wired
    sid = conn.send([{}])["session_id"]
    payload = wire.decode_submission(redis_db.get(wire.payload_key(sid)))
    assert payload["context"] == {"tasks_priority": 0}
    assert payload["scheduler_data"]["task_timeout_sec"] == 3600
    assert payload["scheduler_data"]["retry_count"] == 5


@pytest.mark.parametrize("tasks, error", [
    ([], BadRequestError),
    ([{"ok": 1}, {"bad": object()}], PayloadError),
    ([{"nan": float("nan")}], PayloadError),
    ({"not": "a list"}, BadRequestError),
])
def test_bad_tasks_are_rejected_before_anything_is_written(wired: Any, tasks: Any, error: type) -> None:
    conn, grid, redis_db = wired
    with pytest.raises(error) as info:
        conn.send(tasks)
    assert isinstance(info.value, ValueError)
    assert redis_db.dbsize() == 0
    assert grid.calls() == []


@pytest.mark.parametrize("kwargs", [{"priority": "high"}, {"priority": True}, {"session_id": "a_b"},
                                    {"listener": "no spaces"}, {"task_timeout_sec": 0}, {"retry_count": -1}])
def test_bad_send_arguments(wired: Any, kwargs: dict[str, Any]) -> None:
    conn, grid, redis_db = wired
    with pytest.raises(BadRequestError):
        conn.send([{}], **kwargs)
    assert redis_db.dbsize() == 0 and grid.calls() == []


def test_submit_retried_after_502_and_504_reuses_the_session_id(wired: Any) -> None:
    conn, grid, _ = wired
    grid.script("POST", "/submit", [(502, {"message": "Internal server error"}), (504, "Endpoint request timed out")])
    answer = conn.send([{"a": 1}, {"b": 2}])
    calls = grid.calls("POST", "/submit")
    assert len(calls) == 3
    assert {c.params["submission_content"][0] for c in calls} == {answer["session_id"]}


def test_given_session_id_is_reused(wired: Any) -> None:
    conn, grid, _ = wired
    sid = wire.new_session_id()
    first = conn.send([{"a": 1}], session_id=sid)
    again = conn.send([{"a": 1}], session_id=sid)  # e.g. after the first call raised
    assert first == again == {"session_id": sid, "task_ids": [f"{sid}_0"]}
    assert [c.params["submission_content"] for c in grid.calls()] == [[sid], [sid]]


@pytest.mark.parametrize("status, body, error, message", [
    (400, {"error": "tasks_list.tasks must be ids"}, BadRequestError, "tasks_list.tasks must be ids"),
    (404, "no route /submit", BadRequestError, "no route /submit"),
    (413, {"error": "too large"}, BadRequestError, "too large"),
    (401, {"message": "Unauthorized"}, AuthenticationError, "Unauthorized"),
    (403, {"error": "wrong credentials"}, AuthenticationError, "wrong credentials"),
    (542, "lambda raised KeyError", ControlPlaneError, "lambda raised KeyError"),
    (543, "submit failed", ControlPlaneError, "submit failed"),
])
def test_error_statuses_are_mapped_with_the_servers_message(
        wired: Any, status: int, body: Any, error: type, message: str) -> None:
    conn, grid, _ = wired
    grid.script("POST", "/submit", [(status, body)])
    with pytest.raises(error) as info:
        conn.send([{}])
    assert type(info.value) is error
    assert info.value.status == status
    assert message in str(info.value)
    assert len(grid.calls()) == 1  # none of these is retried


def test_5xx_is_retried_then_raised(wired: Any) -> None:
    conn, grid, _ = wired
    conn.transport.max_attempts = 3
    grid.script("GET", "/result", [(500, {"error": "internal error"})] * 3)
    with pytest.raises(ControlPlaneError) as info:
        conn.poll_session(wire.new_session_id())
    assert info.value.status == 500 and "internal error" in str(info.value)
    assert len(grid.calls()) == 3


def test_answer_that_is_not_json_is_a_control_plane_error(wired: Any) -> None:
    conn, grid, _ = wired
    grid.script("POST", "/submit", [(200, b"<html>gateway</html>")])
    with pytest.raises(ControlPlaneError, match="not JSON"):
        conn.send([{}])


def test_unreachable_grid_raises_grid_unavailable_after_retries(redis_server: Any, redis_db: Any) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with AWSConnector(config_for(url, redis_server), transport=fast_transport(url, max_attempts=3)) as conn:
        started = time.monotonic()
        with pytest.raises(GridUnavailableError) as info:
            conn.poll_session(wire.new_session_id())
        assert isinstance(info.value, ConnectionError)
        assert info.value.__cause__ is not None
        assert time.monotonic() - started < 5


def test_payloads_never_reach_the_log(wired: Any, caplog: pytest.LogCaptureFixture) -> None:
    conn, grid, redis_db = wired
    secret = "TOP-SECRET-PAYLOAD-4711"
    caplog.set_level(logging.DEBUG)
    answer = conn.send([{"secret": secret}])
    tid = answer["task_ids"][0]
    put_outputs(redis_db, {tid: json.dumps({"secret": secret})})
    grid.script("GET", "/result", [(200, plain_answer(finished=[tid]))])
    assert secret in conn.get_results(answer)["finished_OUTPUT"][0]
    text = caplog.text
    assert caplog.records, "the connector logs its lifecycle at DEBUG"
    assert secret not in text
    assert base64.b64encode(json.dumps({"secret": secret}).encode()).decode()[:20] not in text
    assert "the-api-key" not in text


# ---------------------------------------------------------------------------------------- results


def test_result_request_format(wired: Any) -> None:
    conn, grid, _ = wired
    sid = wire.new_session_id()
    grid.script("GET", "/result", [(200, cursor_answer("5-0"))])
    conn.poll_session(sid, after="5-0", wait_sec=1.5)
    [req] = grid.calls()
    assert (req.method, req.path) == ("GET", "/result")
    assert req.params["submission_content"][0] == base64.urlsafe_b64encode(
        json.dumps({"session_id": sid}).encode()).decode()
    assert req.query() == {"session_id": sid}
    assert req.params["after"] == ["5-0"]
    assert req.params["wait_ms"] == ["1500"]
    assert "listener" not in req.params
    assert req.headers["x-api-key"] == "the-api-key"


def test_get_results_plain_deployment(wired: Any) -> None:
    conn, grid, redis_db = wired
    answer = conn.send([{"i": i} for i in range(4)])
    t0, t1, t2, t3 = answer["task_ids"]
    put_outputs(redis_db, {t0: '{"r": 0}', t1: '"one"', t2: "unused"})
    grid.script("GET", "/result", [
        (200, plain_answer()),
        (200, plain_answer(finished=[t1])),
        # every answer lists every terminal task, in no particular order
        (200, plain_answer(finished=[t1, t0], failed=[t3], cancelled=[t2])),
    ])
    started = time.monotonic()
    result = conn.get_results(answer, timeout_sec=10)
    assert time.monotonic() - started >= 2 * 0.02  # polled at the configured interval
    assert result == {
        "finished": [t0, t1], "finished_OUTPUT": ['{"r": 0}', '"one"'],
        "failed": [t3], "failed_OUTPUT": [wire.OUTPUT_PLACEHOLDER], "failed_reason": [""],
        "cancelled": [t2], "cancelled_OUTPUT": [wire.OUTPUT_PLACEHOLDER],
        "metadata": {"tasks_in_response": 4},
    }
    assert len(grid.calls("GET", "/result")) == 3
    assert conn.extensions is False


def test_get_results_timeout_returns_what_is_done(wired: Any) -> None:
    conn, grid, redis_db = wired
    answer = conn.send([{}, {}, {}])
    t0 = answer["task_ids"][0]
    put_outputs(redis_db, {t0: "done"})
    grid.default = lambda req: (200, plain_answer(finished=[t0])) if req.path == "/result" \
        else RecordingGrid.default(grid, req)
    started = time.monotonic()
    result = conn.get_results(answer, timeout_sec=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2
    assert result["finished"] == [t0] and result["finished_OUTPUT"] == ["done"]
    assert result["metadata"]["tasks_in_response"] == 1


def test_get_results_uses_cursor_and_long_poll_when_offered(wired: Any) -> None:
    conn, grid, redis_db = wired
    answer = conn.send([{}, {}])
    t0, t1 = answer["task_ids"]
    put_outputs(redis_db, {t0: "zero"})
    grid.script("GET", "/result", [
        (200, cursor_answer("3-0", finished=[t0], processing=[t1])),
        (200, cursor_answer("4-0", failed={t1: "worker lost 5 times"})),
    ])
    result = conn.get_results(answer, timeout_sec=30)
    first, second = grid.calls("GET", "/result")
    assert first.params["after"] == ["0"] and second.params["after"] == ["3-0"]
    assert int(second.params["wait_ms"][0]) > 0
    assert result["finished"] == [t0] and result["finished_OUTPUT"] == ["zero"]
    assert result["failed"] == [t1] and result["failed_reason"] == ["worker lost 5 times"]
    assert conn.extensions is True


def test_finished_task_without_output_is_reported_failed(wired: Any) -> None:
    conn, grid, _ = wired
    answer = conn.send([{}])
    tid = answer["task_ids"][0]
    grid.script("GET", "/result", [(200, plain_answer(finished=[tid]))] * 2)
    result = conn.get_results(answer)
    assert result["finished"] == [] and result["failed"] == [tid]
    assert "missing from the data plane" in result["failed_reason"][0]
    batch = conn.poll_session(answer["session_id"])
    assert batch.finished == {} and "missing" in batch.failed[tid]


def test_poll_session_cursor_mode(wired: Any) -> None:
    conn, grid, redis_db = wired
    sid = wire.new_session_id()
    put_outputs(redis_db, {f"{sid}_0": "a", f"{sid}_1": "b"})
    grid.script("GET", "/result", [(200, cursor_answer("9-1", finished=[f"{sid}_0", f"{sid}_1"],
                                                       failed={f"{sid}_2": "time limit"},
                                                       cancelled=[f"{sid}_3"], processing=[f"{sid}_4"]))])
    batch = conn.poll_session(sid, after="8-0")
    assert batch == ResultBatch(cursor="9-1", finished={f"{sid}_0": "a", f"{sid}_1": "b"},
                                failed={f"{sid}_2": "time limit"}, cancelled=[f"{sid}_3"],
                                processing=[f"{sid}_4"], extensions=True)


def test_poll_session_plain_mode_emulates_the_wait(wired: Any) -> None:
    conn, grid, redis_db = wired
    sid = wire.new_session_id()
    put_outputs(redis_db, {f"{sid}_0": "x"})
    grid.script("GET", "/result", [(200, plain_answer()), (200, plain_answer()),
                                   (200, plain_answer(finished=[f"{sid}_0"]))])
    batch = conn.poll_session(sid, wait_sec=5)
    assert batch.finished == {f"{sid}_0": "x"} and batch.cursor is None and batch.extensions is False
    assert len(grid.calls()) == 3
    # nothing terminal and no wait: one request, empty batch
    assert not conn.poll_session(sid)


def test_poll_listener_cursor_mode(wired: Any) -> None:
    conn, grid, redis_db = wired
    lid = AWSConnector.new_listener_id()
    s1, s2 = ({"session_id": sid, "task_ids": [f"{sid}_0"]} for sid in (wire.new_session_id(), wire.new_session_id()))
    put_outputs(redis_db, {s2["task_ids"][0]: "two"})
    grid.script("GET", "/result", [(200, cursor_answer("12-0", finished=s2["task_ids"],
                                                       processing=s1["task_ids"]))])
    batch = conn.poll_listener(lid, [s1, s2], after="10-0", wait_sec=20)
    [req] = grid.calls()
    assert req.query() == {"session_id": s1["session_id"]}  # the first session names the request
    assert req.params["listener"] == [lid]
    assert req.params["after"] == ["10-0"] and req.params["wait_ms"] == ["20000"]
    assert batch.cursor == "12-0" and batch.extensions is True
    assert batch.finished == {s2["task_ids"][0]: "two"} and batch.processing == s1["task_ids"]


def test_outputs_inlined_in_the_answer_are_used_and_the_others_read_from_the_data_plane(wired: Any) -> None:
    conn, grid, redis_db = wired
    lid = AWSConnector.new_listener_id()
    sid = wire.new_session_id()
    inlined, unreadable, not_a_string, not_inlined = (f"{sid}_{i}" for i in range(4))
    put_outputs(redis_db, {inlined: "stale", not_inlined: "three"})
    answer = cursor_answer("12-0", finished=[inlined, unreadable, not_a_string, not_inlined])
    answer["inline_outputs"] = {inlined: base64.b64encode(wire.encode_output("zero")).decode(),
                                unreadable: "not base64!", not_a_string: 5}
    grid.script("GET", "/result", [(200, answer)])
    batch = conn.poll_listener(lid, [{"session_id": sid, "task_ids": [inlined]}], after="10-0")
    [req] = grid.calls()
    assert req.params["inline_outputs"] == [str(1 << 20)]
    # the inlined output wins over the data plane's; only the task without one is read there
    assert batch.finished == {inlined: "zero", not_inlined: "three"}
    assert set(batch.failed) == {unreadable, not_a_string}
    assert all("inlined in the grid's answer is unreadable" in r for r in batch.failed.values())
    assert conn.stats()["dataplane_calls"] == 1


def test_inline_outputs_that_are_not_a_map_are_a_control_plane_error(wired: Any) -> None:
    conn, grid, _ = wired
    sid = wire.new_session_id()
    answer = cursor_answer("12-0", finished=[f"{sid}_0"])
    answer["inline_outputs"] = ["x"]
    grid.script("GET", "/result", [(200, answer)])
    with pytest.raises(ControlPlaneError, match="inline_outputs"):
        conn.poll_session(sid, after="10-0")


def test_poll_listener_falls_back_on_a_plain_deployment(wired: Any) -> None:
    conn, grid, redis_db = wired
    lid = AWSConnector.new_listener_id()
    a, b = wire.new_session_id(), wire.new_session_id()
    sa = {"session_id": a, "task_ids": [f"{a}_0", f"{a}_1"]}
    sb = {"session_id": b, "task_ids": [f"{b}_0"]}
    put_outputs(redis_db, {f"{a}_0": "a0", f"{a}_1": "a1", f"{b}_0": "b0"})
    answers = {a: plain_answer(finished=[f"{a}_0"]), b: plain_answer()}

    def by_session(req: Any) -> tuple[int, Any]:
        return 200, answers[req.query()["session_id"]]

    grid.default = by_session
    batch = conn.poll_listener(lid, [sa, sb], after=None)
    assert batch == ResultBatch(cursor=None, finished={f"{a}_0": "a0"}, extensions=False)
    assert [r.query()["session_id"] for r in grid.calls()] == [a, b]

    # only what is new is reported; every session is polled plainly
    answers[a] = plain_answer(finished=[f"{a}_0", f"{a}_1"])
    answers[b] = plain_answer(cancelled=[f"{b}_0"])
    batch = conn.poll_listener(lid, [sa, sb], after=None)
    assert batch.finished == {f"{a}_1": "a1"} and batch.cancelled == [f"{b}_0"]

    # complete sessions are not polled again; with nothing new the wait is emulated, then empty
    grid.requests.clear()
    started = time.monotonic()
    assert not conn.poll_listener(lid, [sa, sb], after=None, wait_sec=0.2)
    assert time.monotonic() - started >= 0.2
    assert grid.calls() == [] or {r.query()["session_id"] for r in grid.calls()} == {a}
    # (the first request of a poll always goes out: it is how a plain server is recognised)


def test_poll_listener_with_no_session_sends_nothing(wired: Any) -> None:
    conn, grid, _ = wired
    assert conn.poll_listener(AWSConnector.new_listener_id(), [], after="7-0") == ResultBatch(cursor="7-0")
    assert grid.calls() == []


def test_bad_answers_are_control_plane_errors(wired: Any) -> None:
    conn, grid, _ = wired
    grid.script("GET", "/result", [(200, ["a", "list"]), (200, {"finished": "not a list"})])
    for _ in range(2):
        with pytest.raises(ControlPlaneError):
            conn.poll_session(wire.new_session_id())


# ----------------------------------------------------------------------------------------- cancel


def test_cancel_sessions_format_and_answer(wired: Any) -> None:
    conn, grid, _ = wired
    a, b = wire.new_session_id(), wire.new_session_id()
    seed_shape = {a: {"cancelled_pending": 3, "cancelled_processing": 1, "total_cancelled_tasks": 4},
                  b: {"cancelled_pending": 0, "cancelled_processing": 0, "total_cancelled_tasks": 0}}
    grid.script("POST", "/cancel", [(200, seed_shape)])
    assert conn.cancel_sessions([a, b]) == seed_shape
    [req] = grid.calls()
    assert (req.method, req.path) == ("POST", "/cancel")
    assert req.query() == {"session_ids_to_cancel": [a, b]}
    assert conn.cancel_sessions([]) == {}
    assert len(grid.calls()) == 1


def test_cancel_tasks(wired: Any) -> None:
    conn, grid, _ = wired
    sid = wire.new_session_id()
    counts = {"cancelled_pending": 1, "cancelled_processing": 1, "total_cancelled_tasks": 2}
    grid.script("POST", "/cancel", [(200, {"tasks": counts}), (200, {})])
    assert conn.cancel_tasks([f"{sid}_0", f"{sid}_3"]) == counts
    assert grid.calls()[0].query() == {"session_ids_to_cancel": [], "task_ids_to_cancel": [f"{sid}_0", f"{sid}_3"]}
    with pytest.raises(ControlPlaneError, match="cannot cancel single tasks"):
        conn.cancel_tasks([f"{sid}_1"])  # a plain deployment answers without "tasks"
    with pytest.raises(BadRequestError, match="not an HTC-Grid task id"):  # as a bad session id is
        conn.cancel_tasks(["not-a-task-id"])


def test_delete_session_data(wired: Any) -> None:
    conn, _, redis_db = wired
    keep = conn.send([{"keep": True}])
    answer = conn.send([{}, {}])
    put_outputs(redis_db, {tid: "out" for tid in answer["task_ids"]})
    assert redis_db.dbsize() == 2 + 5
    conn.delete_session_data(answer)
    assert sorted(k.decode() for k in redis_db.keys()) == sorted(
        [wire.payload_key(keep["session_id"]), wire.input_key(keep["task_ids"][0])])


def test_a_submission_the_grid_rejects_leaves_no_keys(wired: Any) -> None:
    conn, grid, redis_db = wired
    grid.script("POST", "/submit", [(400, {"error": "context.tasks_priority must be within ±1000000"})])
    with pytest.raises(BadRequestError, match="tasks_priority"):
        conn.send([{}, {}], priority=10**9)
    assert redis_db.dbsize() == 0
    # after a 5xx the grid may have accepted the session: its keys stay for the retry
    conn.transport.max_attempts = 1
    grid.script("POST", "/submit", [(502, "bad gateway")])
    with pytest.raises(ControlPlaneError):
        conn.send([{}])
    assert redis_db.dbsize() == 2
